"""`llava` tokenization mode reproduces the original LLaVA code id for id, label for label."""

from __future__ import annotations

import json

import pytest

from llava_cli.data.conversation import RecordError
from llava_cli.data.text.encoding import IGNORE_INDEX
from tests.helpers import GOLDEN_MAX_LENGTH as MAX_LENGTH
from tests.helpers import golden_encode as _encode
from tests.helpers import golden_encoder as _encoder

CASES = [(data, tok) for data in ("real_records", "synthetic_finetune", "synthetic_pretrain")
         for tok in ("vicuna", "vicuna-legacy")]
MODES = ("plain", "v1", "llava_llama_2")

def _supervised_ids(labels):
    return [t for t in labels if t != IGNORE_INDEX]


@pytest.mark.parametrize(("data", "tok"), CASES)
def test_llava_mode_equals_the_original(golden, data, tok):
    encoder = _encoder(tok)
    records = {r["id"]: r for r in json.loads((golden / f"{data}.json").read_text())}
    rows = json.loads((golden / f"{data}.golden.{tok}.json").read_text())["rows"]
    checked = 0
    for row in rows:
        if row["mode"] not in MODES:
            continue
        if "error" in row:
            with pytest.raises(RecordError, match=rf"record '{row['id']}': "):
                _encode(records[row["id"]], row["mode"], encoder)
            continue
        encoded, conv = _encode(records[row["id"]], row["mode"], encoder)
        if row["mismatch"]:
            # The original zeroed these; we supervise exactly the replies plus end-of-turn.
            stop = " </s>" if row["mode"] == "llava_llama_2" else "</s>"
            want = [m.content + stop for m in conv.messages if m.role == "assistant"]
            got = encoder.tokenizer.decode(_supervised_ids(encoded.labels))
            assert got.split() == " ".join(want).split(), (row["id"], row["mode"])
            continue
        assert encoded.input_ids == row["input_ids"][:MAX_LENGTH], (row["id"], row["mode"])
        assert encoded.labels == row["labels"][:MAX_LENGTH], (row["id"], row["mode"])
        checked += 1
    assert checked >= 100


def test_mismatch_rows_are_supervised_not_zeroed(golden):
    """The two records the original silently zeroed get exactly reply + `</s>` here."""
    encoder = _encoder("vicuna")
    tokenizer = encoder.tokenizer
    records = {r["id"]: r for r in json.loads((golden / "synthetic_finetune.json").read_text())}
    encoded, _ = _encode(records["edge-literal-eos-in-text"], "v1", encoder)
    assert tokenizer.decode(_supervised_ids(encoded.labels)) == (
        "The string </s> is the end-of-sequence marker of Llama tokenizers.</s>")
    encoded, _ = _encode(records["edge-empty-answer"], "v1", encoder)
    assert _supervised_ids(encoded.labels) == [tokenizer.eos_token_id]
