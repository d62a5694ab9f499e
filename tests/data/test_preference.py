"""Preference records → pairs of samples (`data.preference_pairs`), their dataset and collator:
every accepted layout to exact ids and labels with the real Llama-2/Vicuna tokenizer, the errors of
bad records, and a DataLoader with workers over real non-square photos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cli.data.conversation import RecordError
from llava_cli.data.preference_pairs import PairBuilder, is_preference_record, preference_records
from llava_cli.data.problems import Problem
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.text.encoding import IGNORE_INDEX
from tests.helpers import llama_tokenizer_as_trained

IMG = 32000  # `<image>` right after Llama-2's 32000 pieces
N_IMAGE_TOKENS = 4
WIDE, CAT, TALL = "extreme_ironing.jpg", "chelsea_cat.png", "cat_tall_500x666.webp"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")
Q = "What is unusual about this image?"
CHOSEN, REJECTED = "A man irons clothes on the back of a taxi.", "Nothing."


@pytest.fixture(scope="module")
def tokenizer(assets):
    tok = llama_tokenizer_as_trained(assets)
    assert tok.convert_tokens_to_ids("<image>") == IMG
    return tok


@pytest.fixture(scope="module")
def pairs(tokenizer, assets):
    options = DataOptions(template="v1", image_folder=str(assets / "images"))
    spec = InputSpec(tokenizer, IMG, lambda size: N_IMAGE_TOKENS, (0.5, 0.5, 0.5))
    return PairBuilder(SampleBuilder(options, spec))


def v1_rows(tokenizer, turns: list[tuple[str, str]], question: str, replies: tuple[str, ...],
            system: str = SYSTEM) -> list[tuple[list[int], list[int]]]:
    """The expected (ids, labels) of each reply, written out independently of the library:
    vicuna_v1's text for the prompt (earlier exchanges `turns`, then `question`), tokenized
    whole; only the last reply and its `</s>` supervised; each `<image>` as its tokens."""
    prompt = f"{system} " if system else ""
    for user, reply in turns:
        prompt += f"USER: {user} ASSISTANT: {reply}</s>"
    prompt += f"USER: {question} ASSISTANT:"
    prompt_ids = tokenizer(prompt).input_ids
    rows = []
    for reply in replies:
        ids = tokenizer(f"{prompt} {reply}</s>").input_ids
        assert ids[: len(prompt_ids)] == prompt_ids  # the prompt tokenizes the same in both
        n = len(prompt_ids)
        labels = [IGNORE_INDEX] * n + ids[n:]
        expanded_ids, expanded_labels = [], []
        for token, label in zip(ids, labels, strict=True):
            count = N_IMAGE_TOKENS if token == IMG else 1
            expanded_ids += [token] * count
            expanded_labels += [label] * count
        rows.append((expanded_ids, expanded_labels))
    return rows


def assert_pair(pair, tokenizer, expected, replies=(CHOSEN, REJECTED)):
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = expected
    assert pair.chosen.encoded.input_ids == chosen_ids
    assert pair.chosen.encoded.labels == chosen_labels
    assert pair.rejected.encoded.input_ids == rejected_ids
    assert pair.rejected.encoded.labels == rejected_labels
    # The same prompt ids in both rows, up to where the replies start.
    start = next(n for n, label in enumerate(chosen_labels) if label != IGNORE_INDEX)
    assert chosen_ids[:start] == rejected_ids[:start]
    assert rejected_labels.index(next(x for x in rejected_labels if x != IGNORE_INDEX)) == start
    for sample, reply in zip((pair.chosen, pair.rejected), replies, strict=True):
        supervised = [x for x in sample.encoded.labels if x != IGNORE_INDEX]
        assert tokenizer.decode(supervised) == f"{reply}</s>"  # the reply and its end of turn
    assert pair.trainable


def test_conversations_chosen_rejected_multi_turn(pairs, tokenizer):
    record = {"id": "multi", "image": WIDE, "conversations": [
        {"from": "human", "value": "<image>\nWhat is the man doing?"},
        {"from": "gpt", "value": "Ironing."},
        {"from": "human", "value": Q}], "chosen": CHOSEN, "rejected": REJECTED}
    assert is_preference_record(record)
    pair = pairs.build(record)
    expected = v1_rows(tokenizer, [("<image>\nWhat is the man doing?", "Ironing.")], Q,
                       (CHOSEN, REJECTED))
    assert_pair(pair, tokenizer, expected)
    # The earlier gpt turn is context, not trained: supervised in SFT, masked here.
    sft = pairs.builder.build({"image": WIDE, "conversations": [
        *record["conversations"], {"from": "gpt", "value": CHOSEN}]})
    assert sft.encoded.input_ids == pair.chosen.encoded.input_ids
    assert sft.encoded.n_supervised > pair.chosen.encoded.n_supervised
    assert tokenizer.decode([x for x in sft.encoded.labels if x != IGNORE_INDEX]) == \
        f"Ironing.</s> {CHOSEN}</s>"
    assert pair.record_id == "multi" and pair.image_sizes == [(570, 380)]


def test_prompt_string_layout(pairs, tokenizer):
    record = {"id": "p", "image": CAT, "prompt": "<image>\nWhat animal is this?",
              "chosen": "A cat.", "rejected": "A dog."}
    pair = pairs.build(record)
    expected = v1_rows(tokenizer, [], "<image>\nWhat animal is this?", ("A cat.", "A dog."))
    assert_pair(pair, tokenizer, expected, ("A cat.", "A dog."))
    assert pair.chosen.encoded.input_ids[:4] == [1, 319, 13563, 1546]  # <s> "A chat between"
    # The supervised ids exactly: "▁A", "▁cat", ".", "</s>" (and "▁dog" in the rejected row).
    assert [x for x in pair.chosen.encoded.labels if x != IGNORE_INDEX] == [319, 6635, 29889, 2]
    assert [x for x in pair.rejected.encoded.labels if x != IGNORE_INDEX] == \
        [319, 11203, 29889, 2]


def test_trl_conversational_layout_with_typed_parts(pairs, tokenizer):
    record = {"images": [WIDE], "prompt": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}],
        "chosen": [{"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": REJECTED}]}]}
    assert is_preference_record(record)
    pair = pairs.build(record, position=7)
    expected = v1_rows(tokenizer, [], f"<image>\n{Q}", (CHOSEN, REJECTED), system="")
    assert_pair(pair, tokenizer, expected)
    assert pair.record_id == "#7"  # no id: where it is
    # Exactly: <s> USER: <image ×4> \n What is unusual … ASSISTANT: … (no system prompt).
    assert pair.chosen.encoded.input_ids[:9] == [1, 3148, 1001, 29901, 29871, IMG, IMG, IMG, IMG]


def test_rlaif_v_layout(pairs, tokenizer):
    record = {"idx": 3, "question": Q, "chosen": CHOSEN, "rejected": REJECTED,
              "image_path": WIDE, "ds_name": "RLAIF-V"}
    chosen_record, rejected_record = preference_records(record, 3)
    assert chosen_record["image"] == rejected_record["image"] == WIDE
    pair = pairs.build(record, 3)
    # No <image> in the question: added at the start of the first human turn, as LLaVA does.
    expected = v1_rows(tokenizer, [], f"<image>\n{Q}", (CHOSEN, REJECTED))
    assert_pair(pair, tokenizer, expected)
    assert "added <image> at the start of the first human turn" in pair.conversation.notes


@pytest.mark.parametrize("preference", [1, 2, "2"])
def test_llava_rlhf_layout(pairs, tokenizer, preference):
    good, bad = "A man is ironing on a taxi.", "A woman is cooking."
    outputs = (good, bad) if int(preference) == 1 else (bad, good)
    record = {"id": "rlhf", "image": TALL, "conversations": [
        {"from": "human", "value": f"<image>\n{Q}"}],
        "output_1": {"from": "llava", "value": outputs[0]},
        "output_2": {"from": "llava", "value": outputs[1]}, "preference": preference}
    assert is_preference_record(record)
    pair = pairs.build(record)
    expected = v1_rows(tokenizer, [], f"<image>\n{Q}", (good, bad))
    assert_pair(pair, tokenizer, expected, (good, bad))
    assert pair.image_sizes == [(500, 666)]


def test_images_are_loaded_once_per_pair(pairs, monkeypatch):
    from llava_cli.data.images import ImageLoader

    loads = []
    decode = ImageLoader.decode
    monkeypatch.setattr(ImageLoader, "decode",
                        lambda *a, **k: loads.append(a) or decode(*a, **k))
    record = {"image": [WIDE, CAT], "prompt": "<image> and <image>: same place?",
              "chosen": "No.", "rejected": "Yes."}
    pair = pairs.build(record)
    assert len(loads) == 2
    assert pair.rejected.images is pair.chosen.images
    assert [image.size for image in pair.images] == [(570, 570), (451, 451)]  # padded square
    assert pair.image_sizes == [(570, 380), (451, 300)]
    assert pair.chosen.encoded.image_spans == pair.rejected.encoded.image_spans


BASE = {"id": "bad", "image": WIDE, "conversations": [{"from": "human", "value": "<image>\nQ"}]}


@pytest.mark.parametrize(("change", "kind", "words"), [
    ({"chosen": None, "rejected": "x"}, Problem.BAD_FIELD, "field 'chosen' must be"),
    ({"rejected": "x"}, Problem.BAD_FIELD, "no 'chosen' reply"),
    ({"chosen": "x"}, Problem.BAD_FIELD, "no 'rejected' reply"),
    ({"chosen": ["a", "b"], "rejected": "x"}, Problem.BAD_FIELD, "field 'chosen' must be"),
    ({"chosen": "x", "rejected": 3}, Problem.BAD_FIELD, "field 'rejected' must be"),
    ({"chosen": "x", "rejected": "x", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
     Problem.ROLE_ERROR, "the prompt must end with a human turn"),
    ({"output_1": "a", "output_2": "b", "preference": 3}, Problem.BAD_FIELD,
     "field 'preference' is 3; expected 1 or 2"),
    ({"output_1": "a", "output_2": "b", "preference": True}, Problem.BAD_FIELD,
     "field 'preference' is True"),
    ({"output_1": "a", "preference": 1}, Problem.BAD_FIELD, "no 'output_2' reply"),
    ({"chosen": {"from": "human", "value": "x"}, "rejected": "y"}, Problem.ROLE_ERROR,
     "field 'chosen' is a turn from 'human'"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, Problem.ROLE_ERROR,
     "field 'chosen' is a turn from 'user'"),
    ({"chosen": "x", "rejected": [{"role": "assistant", "content": [{"type": "video"}]}]},
     Problem.BAD_FIELD, "rejected: parts must be"),
    ({"chosen": "x", "rejected": "y <image>"}, Problem.BAD_FIELD,
     "field 'rejected' holds '<image>'"),
])
def test_bad_records_name_the_record_and_field(pairs, change, kind, words):
    record = {**BASE, **change}
    with pytest.raises(RecordError) as caught:
        pairs.build(record)
    assert caught.value.record_id == "bad" and caught.value.kind == kind
    assert str(caught.value).startswith("record 'bad': ") and words in str(caught.value)


@pytest.mark.parametrize(("record", "kind", "words"), [
    ({"prompt": [], "chosen": "a", "rejected": "b"}, Problem.BAD_FIELD,
     "field 'prompt' must be a non-empty list"),
    ({"prompt": [{"role": "user", "content": [{"type": "text"}]}], "chosen": "a",
      "rejected": "b"}, Problem.BAD_FIELD, "prompt[0].content: parts must be"),
    ({"prompt": [{"role": "user", "content": [{"text": "hi"}]}], "chosen": "a",
      "rejected": "b"}, Problem.BAD_FIELD, "prompt[0].content: parts must be"),
    ({"prompt": [{"role": "tool", "content": "hi"}], "chosen": "a", "rejected": "b"},
     Problem.ROLE_ERROR, "prompt[0].role is 'tool'"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"},
     Problem.BAD_FIELD, "prompt[0].content must be text"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, Problem.ROLE_ERROR, "must end with a human turn"),
    ({"question": 5, "chosen": "a", "rejected": "b"}, Problem.BAD_FIELD, "no prompt"),
    ("not an object", Problem.BAD_FIELD, "a record must be a JSON object"),
])
def test_bad_prompts_name_the_field(pairs, record, kind, words):
    with pytest.raises(RecordError) as caught:
        pairs.build(record, position=4)
    assert caught.value.record_id == "#4" and caught.value.kind == kind
    assert words in str(caught.value)


@pytest.mark.parametrize("room", [0, 4])
def test_truncated_replies(tokenizer, room):
    """Both rows hold the same prompt, so truncation leaves the replies their first tokens
    alike: a prompt that fills model_max_length leaves the pair unusable (both replies fully
    masked); with room for a few tokens the longer reply is cut and the pair still trains."""
    record = {"prompt": "word " * 10, "chosen": "ok", "rejected": "no " * 30}
    (ids, labels), _ = v1_rows(tokenizer, [], "word " * 10, ("ok", "no " * 30))
    prompt = labels.index(next(x for x in labels if x != IGNORE_INDEX))
    spec = InputSpec(tokenizer, IMG, lambda size: N_IMAGE_TOKENS, (0.5, 0.5, 0.5))
    options = DataOptions(template="v1", model_max_length=prompt + room)
    pair = PairBuilder(SampleBuilder(options, spec)).build(record)
    assert pair.encoded.truncated and len(pair.encoded) == prompt + room  # the longer row
    assert pair.rejected.encoded.truncated and len(pair.rejected.encoded) == prompt + room
    assert pair.chosen.encoded.truncated is (room == 0)
    assert pair.trainable is (room > 0)
    assert pair.chosen.trainable is pair.rejected.trainable is (room > 0)


# --- the dataset and collator, in DataLoader workers --------------------------------------

def _dataset_records() -> list[dict]:
    def record(rid: str, image: str, chosen: str, rejected: str) -> dict:
        return {"id": rid, "image": image, "conversations": [
            {"from": "system", "value": ""}, {"from": "human", "value": "<image>\nWhat?"}],
            "chosen": chosen, "rejected": rejected}

    bad = {"id": "no-rejected", "image": WIDE, "prompt": "<image>\nWhat?", "chosen": "x"}
    return [record("wide", WIDE, "Ironing on a taxi.", "Cooking."),
            record("cat", CAT, "A cat.", "A cat and a dog on a long sofa."),
            bad, record("tall", TALL, "A tall cat.", "A bird.")]


def test_dataloader_workers_pairs_and_record_errors(tmp_path: Path, pairs, tokenizer):
    import torch
    from transformers import CLIPImageProcessorPil

    from llava_cli.data.batching.collator import DataCollator
    from llava_cli.data.batching.pair_batches import PairCollator
    from llava_cli.data.dataset import PreferenceDataset
    from llava_cli.data.records import RecordIndex

    records = _dataset_records()
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32})
    dataset = PreferenceDataset(RecordIndex.open(path, cache_dir=tmp_path / "cache"), pairs,
                                processor)
    collate = PairCollator(DataCollator(pad_token_id=tokenizer.pad_token_id))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", collate_fn=collate)
    first, second = list(loader)
    for batch in (first, second):
        rows = batch["input_ids"].shape[0]
        assert rows == 4 and batch["labels"].shape == batch["input_ids"].shape
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert batch["pixel_values"].shape == (2, 3, 32, 32)  # once per pair, not per row
    # Rows: the chosen replies first, then the rejected ones, in the same pair order.
    expected = [pairs.build(records[n], n) for n in (0, 1, 3, 3)]
    for batch, built in ((first, expected[:2]), (second, expected[2:])):
        for row, pair in enumerate(built):
            for half, sample in ((0, pair.chosen), (2, pair.rejected)):
                n = len(sample.encoded)
                assert batch["input_ids"][row + half, :n].tolist() == sample.encoded.input_ids
                assert batch["labels"][row + half, :n].tolist() == sample.encoded.labels
                assert (batch["labels"][row + half, n:] == IGNORE_INDEX).all()
    assert first["record_index"].tolist() == [0, 1]
    # The bad record (#2) was replaced by the next one in its worker; its error travels with
    # the batch, for the trainer to raise in the main process (`RecordError(*errors[0])`).
    assert "record_errors" not in first
    (error,) = second["record_errors"]
    assert error[:2] == ("no-rejected", Problem.BAD_FIELD) and "no 'rejected' reply" in error[2]
    with pytest.raises(RecordError) as caught:
        raise RecordError(*error)
    assert str(caught.value).startswith("record 'no-rejected': no 'rejected' reply")
    with pytest.raises(RecordError, match="no 'rejected' reply"):
        dataset[2]  # without workers: the same error, raised at once
