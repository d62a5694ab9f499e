"""Tokenizer set-up shared by every command: loading, and the `<image>` and pad tokens."""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def add_llava_tokens(tokenizer: Any) -> list[str]:
    """Add `<image>` as a special token and a pad token when missing; return what was added."""
    from tokenizers import AddedToken

    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in tokenizer.get_vocab():
            added.append(PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return added


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local folder or hub id (`trust_remote_code` off unless asked);
    `demo` is the tokenizer this project builds itself (`demo_tokenizer`)."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers ourselves
    if path == "demo":
        from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

        return build_demo_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # transformers' ways of "no tokenizer"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"tokenizer {path!r} could not be loaded ({first}); point --tokenizer "
                         "(or --model-name-or-path) at a folder with tokenizer files, or a "
                         "model that has them") from err
