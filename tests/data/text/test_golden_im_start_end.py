"""`mm_use_im_start_end` in `llava` tokenization mode against the original LLaVA code: its
`preprocess_multimodal` writes each image `<im_start><image><im_end>`, then `preprocess_v1`,
`preprocess_llama_2` and `preprocess_plain` mask it (`original_preprocess.py`, re-written
step for step; the v1 re-write is first checked against the golden v1 rows, which the
original's own function produced). The samples come from `SampleBuilder`, the path training
takes; the tokenizer has `<im_start>`/`<im_end>` added as the original adds them (after its
own vocabulary, special), so the ids are the original's, token for token.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
from tokenizers import AddedToken

from llava_cli.data.conversation import RecordError
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.text.encoding import IGNORE_INDEX
from llava_cli.data.text.sp_original import OriginalSentencePieceTokenizer
from llava_cli.data.text.templates import TEMPLATES
from llava_cli.data.text.tokenizer import IMAGE_MARKERS
from tests.data.text import original_preprocess as original
from tests.helpers import GOLDEN_MAX_LENGTH as MAX_LENGTH
from tests.helpers import golden_folder, load_tokenizer

TOKENIZERS = ("vicuna", "vicuna-legacy")
FINETUNE = [(data, tok) for data in ("real_records", "synthetic_finetune") for tok in TOKENIZERS]


@cache
def _records(data: str) -> list[dict]:
    return json.loads((golden_folder() / f"{data}.json").read_text())


@cache
def _tokenizer(tok: str, markers: bool):
    tokenizer = load_tokenizer(golden_folder() / "tokenizers" / tok)
    if markers:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False)
                              for t in IMAGE_MARKERS], special_tokens=True)
    return tokenizer


def _reference(tok: str, markers: bool):
    """The original slow tokenizer's `tokenizer(text).input_ids`, its BOS id and `legacy`."""
    tokenizer = _tokenizer(tok, markers)
    slow = OriginalSentencePieceTokenizer.from_hf(tokenizer)
    return (lambda text: slow(text)["input_ids"]), tokenizer.bos_token_id, slow.legacy


@cache
def _builder(tok: str, template: str, markers: bool) -> SampleBuilder:
    spec = InputSpec(_tokenizer(tok, markers), -200, lambda size: 1, (0.5, 0.5, 0.5))
    return SampleBuilder(DataOptions(template, "llava", model_max_length=MAX_LENGTH,
                                     mm_use_im_start_end=markers), spec)


def _build(record: dict, tok: str, template: str, markers: bool = True):
    return _builder(tok, template, markers).build(record, load_images=False).encoded


def _supervised(encoded, tok: str) -> list[str]:
    text = _tokenizer(tok, True).decode([t for t in encoded.labels if t != IGNORE_INDEX])
    return text.split()


@pytest.mark.parametrize(("data", "tok"), FINETUNE)
def test_the_v1_reference_reproduces_the_v1_golden(data, tok):
    tokenize, bos, legacy = _reference(tok, False)
    records = {r["id"]: r for r in _records(data)}
    rows = json.loads((golden_folder() / f"{data}.golden.{tok}.json").read_text())["rows"]
    checked = 0
    for row in (r for r in rows if r["mode"] == "v1" and "error" not in r):
        record = records[row["id"]]
        prompt = original.v1_prompt(TEMPLATES["v1"].system, original.multimodal(record))
        ids, labels, mismatch = original.preprocess_v1(
            prompt, tokenize, bos, "image" in record, MAX_LENGTH, legacy)
        assert mismatch == row["mismatch"], row["id"]
        if not mismatch:
            assert (ids, labels) == (row["input_ids"], row["labels"]), row["id"]
            checked += 1
    assert checked >= 100


@pytest.mark.parametrize("template", ["v1", "llama_2"])
@pytest.mark.parametrize(("data", "tok"), FINETUNE)
def test_im_start_end_equals_the_original(data, tok, template):
    tokenize, bos, legacy = _reference(tok, True)
    start, end = _tokenizer(tok, True).convert_tokens_to_ids(list(IMAGE_MARKERS))
    assert (start, end) == (32000, 32001)  # right after the original vocabulary, as there
    checked = marked = 0
    for record in _records(data):
        turns = original.multimodal(record, im_start_end=True)
        if template == "v1":
            prompt = original.v1_prompt(TEMPLATES["v1"].system, turns)
            ids, labels, mismatch = original.preprocess_v1(
                prompt, tokenize, bos, "image" in record, MAX_LENGTH, legacy)
        else:
            prompt = original.llama_2_prompt(TEMPLATES["llama_2"].system, turns)
            ids, labels, mismatch = original.preprocess_llama_2(
                prompt, tokenize, bos, "image" in record, MAX_LENGTH)
        encoded = _build(record, tok, template)
        if any(not text for role, text in turns if role == "gpt"):
            # The original writes no </s> after an empty reply; we do, and supervise it.
            assert _supervised(encoded, tok)[-1].endswith("</s>"), record["id"]
            continue
        assert encoded.input_ids == ids[:MAX_LENGTH], record["id"]
        if mismatch:  # the original zeroed it (an empty reply, a literal </s>): the replies
            stop = "</s>" if template == "v1" else " </s>"
            want = [text + stop for role, text in turns if role == "gpt"]
            assert _supervised(encoded, tok) == " ".join(want).split(), record["id"]
            continue
        assert encoded.labels == labels[:MAX_LENGTH], record["id"]
        # every image within its start/end tokens, both masked (they sit in the human turn)
        for first, last in encoded.image_spans:
            assert (ids[first - 1], ids[last]) == (start, end), record["id"]
            assert labels[first - 1] == labels[last] == IGNORE_INDEX
            marked += 1
        checked += 1
    assert checked >= 100 and marked >= 50


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_plain_drops_the_markers_as_the_original(tok):
    """The original's `preprocess_plain` replaces the first turn by the bare `<image>`, so
    stage 1 with `plain` never shows `<im_start>`/`<im_end>`: neither do we."""
    tokenize, bos, _ = _reference(tok, True)
    checked = 0
    for record in _records("synthetic_pretrain"):
        try:
            encoded = _build(record, tok, "plain")
        except RecordError:
            continue  # not a plain sample (the original asserts two turns with an image)
        ids, labels = original.preprocess_plain(original.multimodal(record, True), tokenize, bos)
        assert (encoded.input_ids, encoded.labels) == (ids[:MAX_LENGTH], labels[:MAX_LENGTH])
        assert encoded.input_ids == _build(record, tok, "plain", markers=False).input_ids
        checked += 1
    assert checked >= 100
