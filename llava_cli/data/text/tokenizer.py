"""Tokenizer set-up shared by every command: loading, and the `<image>`, pad and image
start/end tokens."""

from __future__ import annotations

from typing import Any

from llava_cli.data.text.templates import IMAGE_END, IMAGE_START

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IMAGE_MARKERS = (IMAGE_START, IMAGE_END)


def add_llava_tokens(tokenizer: Any, im_start_end: bool = False) -> list[str]:
    """Add `<image>` as a special token and a pad token when missing, and with `im_start_end`
    `<im_start>`/`<im_end>` last (special, as the original adds them); return what was
    added."""
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
    if im_start_end:
        missing = [t for t in IMAGE_MARKERS if t not in tokenizer.get_vocab()]
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
        added += missing
    return added


def marker_ids(tokenizer: Any) -> list[int]:
    """The ids of `<im_start>` and `<im_end>` (added by `add_llava_tokens`)."""
    return [tokenizer.convert_tokens_to_ids(token) for token in IMAGE_MARKERS]


def check_image_markers(tokenizer: Any, im_start_end: bool, source: str) -> None:
    """The starting model's tokenizer has `<im_start>`/`<im_end>` exactly when the run asks
    for them (`mm_use_im_start_end`): their embedding rows are part of the model."""
    vocab = tokenizer.get_vocab()
    present = [t for t in IMAGE_MARKERS if t in vocab]
    if im_start_end and len(present) < len(IMAGE_MARKERS):
        raise ValueError(f"mm_use_im_start_end: {source} has no {'/'.join(IMAGE_MARKERS)} "
                         "tokens; start from an LLM (a new model gets them) or from a run "
                         "trained with mm_use_im_start_end, or drop the setting")
    if not im_start_end and present:
        raise ValueError(f"{source} was trained with {'/'.join(present)} around each image "
                         "(mm_use_im_start_end); pass --set mm_use_im_start_end=true")


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local folder or hub id (`trust_remote_code` off unless asked);
    `demo` is the tokenizer this project builds itself (`demo_tokenizer`), unless a local
    path of that name exists: a path that exists is always read as that path (every other
    check, the output-directory overlap rule among them, reads it so too)."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers ourselves
    if path == "demo" and not os.path.exists(path):
        from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

        return build_demo_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:  # transformers' ways of "no tokenizer"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shadow = (f" (the local path {os.path.abspath(path)!r} is read as that path, not as "
                  "the built-in demo tokenizer; run from another directory or rename it)"
                  if path == "demo" else "")
        raise ValueError(f"tokenizer {path!r} could not be loaded ({first}){shadow}; point "
                         "--tokenizer (or --model-name-or-path) at a folder with tokenizer "
                         "files, or a model that has them") from err
