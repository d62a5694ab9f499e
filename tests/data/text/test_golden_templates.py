"""`llama_2` and `mpt` in `llava` tokenization mode against the original LLaVA code.

The golden files cover plain, v1 and llava_llama_2 only, so the reference here is the
original's `preprocess_llama_2` / `preprocess_mpt` re-written step for step
(`original_preprocess.py`); that re-write is first checked against the llava_llama_2 golden
rows, which the same original function produced.

mpt with a Llama tokenizer is broken in the original: `<|im_end|>` is several pieces and every
round's length is counted with an extra BOS, so it prints "tokenization mismatch" and masks
every label of every record (all but the records too long to check, whose masks are off by
one token: the newline after "assistant" supervised). We supervise what the template says —
each reply and its `<|im_end|>` (with a Llama tokenizer, less the final `>` where it merges
with the next turn's `<`) — and the ids are the original's, token for token.
"""

from __future__ import annotations

import json
from functools import cache

import pytest

from llava_cli.data.text.encoding import IGNORE_INDEX
from llava_cli.data.text.sp_original import OriginalSentencePieceTokenizer
from llava_cli.data.text.templates import TEMPLATES
from tests.data.text import original_preprocess as original
from tests.helpers import GOLDEN_MAX_LENGTH as MAX_LENGTH
from tests.helpers import golden_encode as _encode
from tests.helpers import golden_encoder as _encoder
from tests.helpers import golden_folder

CASES = [(data, tok) for data in ("real_records", "synthetic_finetune")
         for tok in ("vicuna", "vicuna-legacy")]


@cache
def _records(data: str) -> list[dict]:
    return json.loads((golden_folder() / f"{data}.json").read_text())


def _reference(tok: str):
    """The original slow tokenizer's `tokenizer(text).input_ids`, its BOS id and `legacy`."""
    tokenizer = _encoder(tok).tokenizer
    slow = OriginalSentencePieceTokenizer.from_hf(tokenizer)
    return (lambda text: slow(text)["input_ids"]), tokenizer.bos_token_id, slow.legacy


def _replies(record: dict, stop: str) -> list[str]:
    return [text + stop for role, text in original.multimodal(record) if role == "gpt"]


def _supervised_text(encoded, tok: str) -> str:
    return _encoder(tok).tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize(("data", "tok"), CASES)
def test_the_reference_reproduces_the_llava_llama_2_golden(data, tok):
    tokenize, bos, _ = _reference(tok)
    records = {r["id"]: r for r in _records(data)}
    rows = json.loads((golden_folder() / f"{data}.golden.{tok}.json").read_text())["rows"]
    checked = 0
    for row in (r for r in rows if r["mode"] == "llava_llama_2" and "error" not in r):
        record = records[row["id"]]
        prompt = original.llama_2_prompt(TEMPLATES["llava_llama_2"].system,
                                         original.multimodal(record))
        ids, labels, mismatch = original.preprocess_llama_2(
            prompt, tokenize, bos, "image" in record, MAX_LENGTH)
        assert mismatch == row["mismatch"], row["id"]
        if not mismatch:
            assert (ids, labels) == (row["input_ids"], row["labels"]), row["id"]
            checked += 1
    assert checked >= 100


@pytest.mark.parametrize(("data", "tok"), CASES)
def test_llama_2_equals_the_original(data, tok):
    tokenize, bos, _ = _reference(tok)
    encoder, checked = _encoder(tok), 0
    for record in _records(data):
        prompt = original.llama_2_prompt(TEMPLATES["llama_2"].system, original.multimodal(record))
        ids, labels, mismatch = original.preprocess_llama_2(
            prompt, tokenize, bos, "image" in record, MAX_LENGTH)
        encoded, _ = _encode(record, "llama_2", encoder)
        if mismatch:  # the original zeroed it (an empty reply, a literal </s>): the replies
            want = " ".join(_replies(record, " </s>")).split()
            assert _supervised_text(encoded, tok).split() == want, record["id"]
            continue
        assert encoded.input_ids == ids[:MAX_LENGTH], record["id"]
        assert encoded.labels == labels[:MAX_LENGTH], record["id"]
        checked += 1
    assert checked >= 100


@pytest.mark.parametrize(("data", "tok"), CASES)
def test_mpt_has_the_original_ids_and_supervises_the_replies(data, tok):
    tokenize, bos, legacy = _reference(tok)
    encoder = _encoder(tok)
    for record in _records(data):
        prompt = original.mpt_prompt(TEMPLATES["mpt"].system, original.multimodal(record))
        ids, _, mismatch = original.preprocess_mpt(
            prompt, tokenize, bos, "image" in record, MAX_LENGTH, legacy)
        encoded, _ = _encode(record, "mpt", encoder)
        if any(not text for role, text in original.multimodal(record) if role == "gpt"):
            # The original writes no <|im_end|> after an empty reply; we do, and supervise it.
            assert _supervised_text(encoded, tok).endswith("<|im_end|>"), record["id"]
            continue
        assert encoded.input_ids == ids[:MAX_LENGTH], record["id"]
        if len(ids) < MAX_LENGTH:  # short enough for the original's length check
            assert mismatch, f"{record['id']}: the original zeroes every such record"
            # "<|im_end|><|im_start|>" tokenizes with "><" as one piece, which ends after the
            # reply's span: context, so a reply followed by another turn ends in "<|im_end|".
            want = "".join(_replies(record, "<|im_end|>"))
            want = want[:-1].replace("<|im_end|>", "<|im_end|") + want[-1:]
            got = _supervised_text(encoded, tok)
            assert got.replace(" ", "") == want.replace(" ", ""), record["id"]
