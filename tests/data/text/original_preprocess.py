"""The original LLaVA's `preprocess_llama_2`, `preprocess_mpt`, `preprocess_v1` and
`preprocess_plain` (llava/train/train.py at haotian-liu/LLaVA c121f04), re-written here step
for step as the reference for what the golden files do not cover (those templates, and
`mm_use_im_start_end`).

What is reproduced: `preprocess_multimodal` (the image moved to the front of its turn, and with
`mm_use_im_start_end` written `<im_start><image><im_end>` in every turn of an image record),
`Conversation.get_prompt` for the LLAMA_2, MPT and TWO (vicuna_v1) separator styles,
`tokenizer_image_token` (each chunk between images tokenized alone, BOS kept on the first),
the round-by-round masking with its length arithmetic, and the "tokenization mismatch" rule
(every label masked when the counted length differs from the real one). `tokenize(text)` must
return the original slow tokenizer's ids (BOS first) — `OriginalSentencePieceTokenizer` does.
"""

from __future__ import annotations

from collections.abc import Callable

IGNORE = -100
IMAGE = -200
Tokenize = Callable[[str], list[int]]


def multimodal(record: dict, im_start_end: bool = False) -> list[tuple[str, str]]:
    """(role, text) turns as the original feeds them: a first turn not from the human
    dropped, `<image>` moved to the front of its turn with a newline, and with
    `im_start_end` every `<image>` of an image record within `<im_start>`/`<im_end>`."""
    turns = list(record["conversations"])
    if turns and turns[0]["from"] != "human":
        turns = turns[1:]
    out = []
    for turn in turns:
        value = turn["value"]
        if "<image>" in value and "image" in record:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        if im_start_end and "image" in record:
            value = value.replace("<image>", "<im_start><image><im_end>")
        out.append((turn["from"], value))
    return out


def tokenizer_image_token(prompt: str, tokenize: Tokenize, bos: int | None) -> list[int]:
    chunks = [tokenize(chunk) for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
    ids = [chunks[0][0]] if offset else []
    for n, chunk in enumerate(chunks):
        if n:
            ids.append(IMAGE)
        ids.extend(chunk[offset:])
    return ids


def llama_2_prompt(system: str, turns: list[tuple[str, str]], sep: str = "<s>",
                   sep2: str = "</s>") -> str:
    """`get_prompt` of SeparatorStyle.LLAMA_2."""
    out = ""
    for i, (_, message) in enumerate(turns):
        if not message:
            continue  # the original writes nothing for an empty message
        if i == 0 and system:
            message = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + message
        out += sep + f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " " + sep2
    return out.lstrip(sep)  # characters, as the original strips them


def mpt_prompt(system: str, turns: list[tuple[str, str]]) -> str:
    """`get_prompt` of SeparatorStyle.MPT with conv_mpt's roles and separator."""
    roles = {"human": "<|im_start|>user\n", "gpt": "<|im_start|>assistant\n"}
    out = f"<|im_start|>system\n{system}<|im_end|>"
    for role, message in turns:
        out += roles[role] + message + "<|im_end|>" if message else roles[role]
    return out


def v1_prompt(system: str, turns: list[tuple[str, str]], sep: str = " ",
              sep2: str = "</s>") -> str:
    """`get_prompt` of SeparatorStyle.TWO with conv_vicuna_v1's roles."""
    roles, seps = {"human": "USER", "gpt": "ASSISTANT"}, (sep, sep2)
    out = system + sep
    for i, (role, message) in enumerate(turns):
        out += roles[role] + ": " + message + seps[i % 2] if message else roles[role] + ":"
    return out


def preprocess_v1(prompt: str, tokenize: Tokenize, bos: int | None, has_image: bool,
                  max_length: int, legacy: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, mismatch) as `preprocess_v1` makes them (tokenizers >= 0.14)."""
    ids = _ids(prompt, tokenize, bos, has_image)
    ids = ids if has_image else ids[:max_length]
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE] * cur
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenize, bos, has_image))
        instruction_len = len(_ids(parts[0] + sep, tokenize, bos, has_image)) - 2
        if i != 0 and not legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    return _unless_mismatch(ids, labels, cur, max_length)


def preprocess_plain(turns: list[tuple[str, str]], tokenize: Tokenize, bos: int | None,
                     sep: str = "\n") -> tuple[list[int], list[int]]:
    """(input_ids, labels) as `preprocess_plain` makes them: the first turn replaced by the
    bare `<image>` (so `<im_start>`/`<im_end>` are dropped again), the caption and `sep`
    supervised."""
    first = "<image>"
    ids = tokenizer_image_token(first + turns[1][1] + sep, tokenize, bos)
    masked = len(tokenizer_image_token(first, tokenize, bos))
    return ids, [IGNORE] * masked + ids[masked:]


def _ids(text: str, tokenize: Tokenize, bos: int | None, has_image: bool) -> list[int]:
    return tokenizer_image_token(text, tokenize, bos) if has_image else tokenize(text)


def preprocess_llama_2(prompt: str, tokenize: Tokenize, bos: int | None, has_image: bool,
                       max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, mismatch) as `preprocess_llama_2` makes them."""
    ids = _ids(prompt, tokenize, bos, has_image)
    ids = ids if has_image else ids[:max_length]
    labels = list(ids)
    cur = 1
    labels[:cur] = [IGNORE] * cur
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        parts = rou.split("[/INST] ")
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenize, bos, has_image))
        instruction_len = len(_ids(parts[0] + "[/INST] ", tokenize, bos, has_image)) - 2
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    return _unless_mismatch(ids, labels, cur, max_length)


def preprocess_mpt(prompt: str, tokenize: Tokenize, bos: int | None, has_image: bool,
                   max_length: int, legacy: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, mismatch) as `preprocess_mpt` makes them (tokenizers >= 0.14)."""
    ids = _ids(prompt, tokenize, bos, has_image)
    ids = ids if has_image else ids[:max_length]
    labels = list(ids)
    sep, rounds = "<|im_end|>", prompt.split("<|im_end|>")
    regrouped = [sep.join(rounds[:3])]  # system + user + gpt
    regrouped += [sep.join(rounds[i:i + 2]) for i in range(3, len(rounds), 2)]
    cur = 0
    for i, rou in enumerate(regrouped):
        if rou == "":
            break
        parts = rou.split(sep + "<|im_start|>assistant\n")
        if len(parts) != 2:
            break
        round_len = len(_ids(rou, tokenize, bos, has_image))
        instruction_len = len(_ids(parts[0] + sep + "<|im_start|>assistant\n", tokenize, bos,
                                   has_image)) - 1
        if i != 0 and legacy:
            round_len, instruction_len = round_len + 1, instruction_len + 1
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE] * len(labels[cur:])
    return _unless_mismatch(ids, labels, cur, max_length)


def _unless_mismatch(ids: list[int], labels: list[int], cur: int, max_length: int,
                     ) -> tuple[list[int], list[int], bool]:
    """The original's check: a counted length that is not the real one masks everything
    (`total_len` counts the non-pad ids; pad is unk, which no prompt here contains)."""
    if cur < max_length and cur != len(ids):
        return ids, [IGNORE] * len(ids), True
    return ids, labels, False
