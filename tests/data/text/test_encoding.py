"""Token ids and labels: image expansion, truncation, and hf mode agreeing with llava mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.text.encoding import IGNORE_INDEX, TextEncoder
from llava_cli.data.text.templates import TEMPLATES, Message, render
from llava_cli.data.text.tokenizer import add_llava_tokens
from tests.helpers import load_tokenizer


@pytest.fixture(scope="module")
def demo():
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    return build_demo_tokenizer()


def _supervised(encoded):
    return [t for t in encoded.labels if t != IGNORE_INDEX]


def test_exact_ids_and_labels_with_image_expansion(demo):
    image_id = demo.convert_tokens_to_ids("<image>")
    rendered = render(TEMPLATES["plain"], [Message("user", "<image>"), Message("assistant", "red")])
    encoded = TextEncoder(demo, image_id)(rendered, [3])
    caption = demo("red\n", add_special_tokens=False).input_ids
    assert encoded.input_ids == [demo.bos_token_id, image_id, image_id, image_id, *caption]
    assert encoded.labels == [IGNORE_INDEX] * 4 + caption
    assert encoded.image_spans == [(1, 4)]


def test_truncation_never_cuts_an_image(demo):
    image_id = demo.convert_tokens_to_ids("<image>")
    rendered = render(TEMPLATES["v1"], [Message("user", "Q <image>"), Message("assistant", "red")])
    full = TextEncoder(demo, image_id)(rendered, [10])
    start, end = full.image_spans[0]
    cut = TextEncoder(demo, image_id, max_length=start + 5)(rendered, [10])
    assert cut.truncated and cut.input_ids == full.input_ids[:start]
    assert cut.image_spans == [] and cut.n_supervised == 0


def test_wrong_image_count_is_an_error(demo):
    image_id = demo.convert_tokens_to_ids("<image>")
    rendered = render(TEMPLATES["v1"], [Message("user", "<image>"), Message("assistant", "a")])
    with pytest.raises(ValueError, match=r"the prompt has 1 image token\(s\) for 2 image\(s\)"):
        TextEncoder(demo, image_id)(rendered, [4, 4])


def test_unknown_mode(demo):
    with pytest.raises(ValueError, match="unknown tokenization mode 'fast'"):
        TextEncoder(demo, 4, "fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("template", ["v1", "llava_llama_2", "plain"])
def test_hf_mode_supervises_the_same_text_as_llava_mode(golden, template):
    """Whole-prompt (hf) and chunked (llava) tokenization differ in ids, not in what is learned."""
    tokenizer = load_tokenizer(golden / "tokenizers" / "vicuna")
    add_llava_tokens(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    records = json.loads((golden / "synthetic_finetune.json").read_text())
    if template == "plain":
        records = [r for r in records if r.get("image") and len(r["conversations"]) == 2]
    spec = InputSpec(tokenizer, image_id, lambda size: 5, (0.5, 0.5, 0.5))
    builders = {mode: SampleBuilder(DataOptions(template, mode, model_max_length=None), spec)
                for mode in ("hf", "llava")}
    compared = 0
    for position, record in enumerate(records[:120]):
        hf, llava = (builders[m].build(record, position, load_images=False) for m in builders)
        assert hf.encoded.n_image_tokens == 5 * len(hf.conversation.images)
        hf_text = tokenizer.decode(_supervised(hf.encoded))
        llava_text = tokenizer.decode(_supervised(llava.encoded))
        assert hf_text.split() == llava_text.split(), record["id"]
        compared += 1
    assert compared >= 20


def test_hf_mode_matches_the_saved_llava_hf_tokenizer(assets):
    """In hf mode the prompt ids are what llava-hf's own tokenizer gives at inference."""
    tokenizer = load_tokenizer(assets / "tokenizers" / "llava-1.5-7b-hf")
    rendered = render(TEMPLATES["v1"], [Message("user", "<image>\nWhat is shown?"),
                                        Message("assistant", "A cat.")])
    encoded = TextEncoder(tokenizer, 32000)(rendered, [1])
    assert encoded.input_ids == tokenizer(rendered.text).input_ids
    assert 29871 in encoded.input_ids[:encoded.image_spans[0][0] + 1]  # "▁" before <image>
    assert tokenizer.decode(_supervised(encoded)) == "A cat.</s>"


def test_labels_from_unsorted_and_overlapping_spans() -> None:
    from llava_cli.data.text.encoding import _labels_from_spans

    ids = [10, 11, 12, 13, 14, 15]
    ends = np.array([-1, 2, 4, 6, 8, 10])  # BOS (no text), then tokens ending at 2, 4, ...
    # Spans given out of order, two of them overlapping: (1, 4] and (3, 6] make (1, 6].
    labels = _labels_from_spans(ids, ends, [(7, 8), (3, 6), (1, 4)])
    assert labels.tolist() == [IGNORE_INDEX, 11, 12, 13, 14, IGNORE_INDEX]
    assert _labels_from_spans(ids, ends, []).tolist() == [IGNORE_INDEX] * 6
