"""The chunk-cached tokenization gives exactly the library's ids and labels, or is not used."""

from __future__ import annotations

import json
import random
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from llava_cli.data.conversation import RecordError, parse_record
from llava_cli.data.text import chunked_tokenizer, encoding
from llava_cli.data.text.chunked_tokenizer import ChunkedEncoder
from llava_cli.data.text.encoding import TextEncoder
from llava_cli.data.text.templates import TEMPLATES, render
from llava_cli.data.text.tokenizer import add_llava_tokens
from tests.helpers import load_tokenizer

SENTENCEPIECE_STYLE = ("llama2-vicuna-v1.5", "mistral-7b-v0.1")  # prepend "first" / "always"
DATA_FILES = ("llava_instruct_misc_real.json", "sharegpt_text_only_sample.json",
              "pretrain_blip_laion_cc_sbu_558k_sample.json",
              "llava_bench_coco_gpt4_qa_DERIVED_conversations.json")
FUZZ_PARTS = [*"ab cd\n\t.,?!'", "▁", "  ", "   ", "<image>", "</s>", "<s>", "<unk>", "é",
              "🦙", "漢字", "USER:", " the", "\n\n", "<0x0A>", "<ima", "ge>"]


@cache
def _tokenizer(assets: Path, name: str):
    tokenizer = load_tokenizer(assets / "tokenizers" / name)
    add_llava_tokens(tokenizer)
    return tokenizer


@pytest.fixture
def llama(assets: Path):
    return _tokenizer(assets, "llama2-vicuna-v1.5")


def _records(assets: Path) -> list[dict]:
    records = []
    for name in DATA_FILES:
        records += json.loads((assets / "data" / name).read_text())
    return records


def _texts(assets: Path) -> list[str]:
    """Every real record rendered in every template that accepts it."""
    texts = []
    for record in _records(assets):
        for name in ("plain", "v1", "llama_2", "mpt", "chatml", "llama3"):
            template = TEMPLATES[name]
            try:
                conv = parse_record(record, strict=template.max_rounds is not None)
            except RecordError:
                continue
            if template.requires_image and not conv.images:
                continue
            texts.append(render(template, conv.messages, conv.system).text)
    return texts


@pytest.mark.parametrize("name", SENTENCEPIECE_STYLE)
def test_equal_to_the_library_on_every_real_record(assets: Path, name: str) -> None:
    encoder = ChunkedEncoder.for_tokenizer(_tokenizer(assets, name))
    assert encoder is not None
    texts = _texts(assets)
    assert len(texts) > 100
    for text in texts:
        ids, ends = encoder.encode(text)
        expected_ids, expected_ends = encoder.reference(text)
        assert ids == expected_ids, text[:80]
        assert ends.tolist() == expected_ends.tolist(), text[:80]
    assert encoder.spaced  # the cache was used, not bypassed


@pytest.mark.parametrize("name", SENTENCEPIECE_STYLE)
def test_equal_to_the_library_on_fuzzed_texts(assets: Path, name: str) -> None:
    encoder = ChunkedEncoder.for_tokenizer(_tokenizer(assets, name))
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(FUZZ_PARTS) for _ in range(rng.randint(0, 25)))
        assert encoder.agrees(text), repr(text)


def test_text_encoder_output_unchanged(assets: Path, llama) -> None:
    fast = TextEncoder(llama, llama.convert_tokens_to_ids("<image>"), "hf", 2048)
    plain = TextEncoder(llama, fast.image_token_id, "hf", 2048)
    plain._chunked = None
    assert fast._chunked is not None
    template = TEMPLATES["v1"]
    for record in _records(assets)[:200]:
        conv = parse_record(record)
        rendered = render(template, conv.messages, conv.system)
        counts = [576] * len(conv.images)
        got, want = fast(rendered, counts), plain(rendered, counts)
        assert got.input_ids == want.input_ids and got.labels == want.labels
        assert got.image_spans == want.image_spans


def test_tokenizers_it_cannot_prove_exact_get_none(assets: Path) -> None:
    # Byte-level BPE with a regex pre-tokenizer (Qwen2): a different pipeline.
    assert ChunkedEncoder.for_tokenizer(_tokenizer(assets, "qwen2-1.5b-instruct")) is None
    # A slow (pure-Python) tokenizer has no backend.
    assert ChunkedEncoder.for_tokenizer(object()) is None


def _variant(tokenizer, edit):
    """A fast tokenizer built from `tokenizer`'s JSON after `edit(json_dict)`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer._tokenizer.to_str())
    edit(data)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)))


def test_a_vocabulary_token_across_a_cut_disables_it(llama) -> None:
    assert ChunkedEncoder.for_tokenizer(_variant(llama, lambda d: None)) is not None

    def add_spanning_token(data):
        data["model"]["vocab"]["x▁y"] = len(data["model"]["vocab"])

    assert ChunkedEncoder.for_tokenizer(_variant(llama, add_spanning_token)) is None


def test_other_pipelines_disable_it(llama) -> None:
    def legacy_normalizer(data):
        data["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}

    def stripping_added_token(data):
        data["added_tokens"][-1]["lstrip"] = True

    def splitting_metaspace(data):
        data["pre_tokenizer"]["split"] = True

    for edit in (legacy_normalizer, stripping_added_token, splitting_metaspace):
        assert ChunkedEncoder.for_tokenizer(_variant(llama, edit)) is None, edit.__name__


def test_cache_stays_bounded_and_exact(assets: Path, llama, monkeypatch) -> None:
    monkeypatch.setattr(chunked_tokenizer, "CACHE_LIMIT", 16)
    encoder = ChunkedEncoder.for_tokenizer(llama)
    for text in _texts(assets)[:50]:
        assert encoder.agrees(text)
        # Cleared before a text once full: at most the limit plus one text's chunks (an added
        # token, each starting with "<", can split one more chunk off).
        most = 16 + len(chunked_tokenizer._CHUNK.findall(text)) + text.count("<")
        assert sum(map(len, encoder._caches)) <= most


def test_spot_check_falls_back_to_the_library(llama, monkeypatch) -> None:
    monkeypatch.setattr(encoding, "VERIFY_EVERY", 1)
    text_encoder = TextEncoder(llama, llama.convert_tokens_to_ids("<image>"), "hf")
    text = "USER: what is the answer? ASSISTANT: the answer"
    text_encoder._chunked.spaced["answer"] = ([42], [7], 1, 7)  # a wrong cached entry
    with pytest.warns(RuntimeWarning, match="disagreed with the tokenizer"):
        ids, _ = text_encoder._tokenize_hf(text)
    assert ids == llama(text).input_ids
    assert text_encoder._chunked is None


def test_tokens_added_later_are_seen(llama) -> None:
    from tokenizers import AddedToken

    tokenizer = _variant(llama, lambda d: None)
    text_encoder = TextEncoder(tokenizer, 32000, "hf")
    before = text_encoder._chunked
    tokenizer.add_tokens([AddedToken("<extra>", special=True, normalized=False)],
                         special_tokens=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, _ = text_encoder._tokenize_hf("a <extra> b")
    assert ids == tokenizer("a <extra> b").input_ids
    assert tokenizer.convert_tokens_to_ids("<extra>") in ids
    assert text_encoder._chunked is not before


def test_owner_ends_mark_added_tokens() -> None:
    ends = chunked_tokenizer.owner_ends([(0, 0), (0, 3), (3, 4), (4, 4)])
    assert ends.tolist() == [-1, 3, 4, -1]
    assert np.asarray(ends).dtype == np.int64
