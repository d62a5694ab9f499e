"""LazySupervisedDataset + DataCollator: real tokenizer, tiny CLIP processor, real images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_cli.data.batching.collator import DataCollator
from llava_cli.data.conversation import RecordError
from llava_cli.data.dataset import LazySupervisedDataset
from llava_cli.data.problems import Dropped, Problem, ProblemCounter
from llava_cli.data.records import RecordIndex
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.text.encoding import IGNORE_INDEX
from tests.helpers import llama_tokenizer_as_trained

N_IMAGE_TOKENS = (32 // 8) ** 2  # a 32px CLIP with patch 8, "default" feature strategy
IMG = 32000  # `<image>` is added right after Llama-2's 32000 pieces
PAD = 0  # LLaVA-1.5 pads Vicuna with <unk>
NO_SYSTEM = {"from": "system", "value": ""}  # keeps the expected ids short


def _turns(user: str, reply: str) -> list[dict[str, str]]:
    return [NO_SYSTEM, {"from": "human", "value": user}, {"from": "gpt", "value": reply}]


RECORDS = [
    {"id": "one-image", "image": "red.png", "conversations": _turns("<image>\nHi", "Hello")},
    {"id": "text-only", "conversations": _turns("Hi", "Hello there")},
    {"id": "two-images", "image": ["red.png", "blue.png"],
     "conversations": _turns("<image> and <image>: same?", "No")},
    {"id": "missing-image", "image": "nowhere/gone.png",
     "conversations": _turns("<image>\nHi", "Hello")},
    {"id": "long-prompt", "conversations": _turns("word " * 40, "Yes")},
]


@pytest.fixture(scope="module")
def tokenizer(assets):
    """The real Llama-2/Vicuna tokenizer with `<image>` and a pad token, as training sets it."""
    tok = llama_tokenizer_as_trained(assets)
    assert tok.convert_tokens_to_ids("<image>") == IMG and tok.pad_token_id == PAD
    return tok


@pytest.fixture(scope="module")
def processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32},
                                 crop_size={"height": 32, "width": 32})


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 30), (10, 10, 200)).save(tmp_path / "blue.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def make_dataset(path: Path, tokenizer, processor, max_length: int | None = 2048,
                 skip_bad_records: bool = False, aspect: str = "pad",
                 image_folder: Path | None = None) -> LazySupervisedDataset:
    options = DataOptions(template="v1", image_folder=str(image_folder or path.parent),
                          model_max_length=max_length, image_aspect_ratio=aspect)
    mean = tuple(processor.image_mean) if processor is not None else (0.5, 0.5, 0.5)
    builder = SampleBuilder(options, InputSpec(tokenizer, IMG, lambda size: N_IMAGE_TOKENS, mean))
    index = RecordIndex.open(path, cache_dir=path.parent / "cache")
    return LazySupervisedDataset(index, builder, processor, skip_bad_records=skip_bad_records)


def by_id(record_id: str) -> int:
    return next(n for n, r in enumerate(RECORDS) if r["id"] == record_id)


def test_image_record_exact_ids_labels_and_pixels(data_file, tokenizer, processor):
    ds = make_dataset(data_file, tokenizer, processor)
    item = ds[0]
    # "USER: <image>\nHi ASSISTANT: Hello</s>", ids read off the tokenizer by hand:
    # <s> ▁US ER : ▁ <image> <0x0A> Hi ▁A SS IST ANT : ▁Hello </s>
    prompt = [1, 3148, 1001, 29901, 29871]
    rest = [13, 18567, 319, 1799, 9047, 13566, 29901]
    reply = [15043, 2]
    assert tokenizer.convert_ids_to_tokens(reply) == ["▁Hello", "</s>"]
    assert item["input_ids"].tolist() == prompt + [IMG] * N_IMAGE_TOKENS + rest + reply
    assert item["labels"].tolist() == [IGNORE_INDEX] * (5 + N_IMAGE_TOKENS + 7) + reply
    assert item["input_ids"].dtype == item["labels"].dtype == torch.long
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    assert item["pixel_values"].dtype == torch.float32
    assert "image_sizes" not in item and item["record_index"] == 0


def test_text_only_and_multi_image(data_file, tokenizer, processor):
    ds = make_dataset(data_file, tokenizer, processor)
    text = ds[by_id("text-only")]
    assert "pixel_values" not in text and IMG not in text["input_ids"].tolist()
    two = ds[by_id("two-images")]
    assert two["pixel_values"].shape == (2, 3, 32, 32)
    assert two["input_ids"].tolist().count(IMG) == 2 * N_IMAGE_TOKENS
    # Two different images (red, then blue) in record order.
    assert two["pixel_values"][0, 0].mean() > two["pixel_values"][1, 0].mean()


def test_truncation_keeps_only_images_whose_tokens_remain(data_file, tokenizer, processor):
    record = {"id": "two-turns", "image": ["red.png", "blue.png"], "conversations": [
        NO_SYSTEM, {"from": "human", "value": "<image>\nA"}, {"from": "gpt", "value": "B"},
        {"from": "human", "value": "<image>\nC"}, {"from": "gpt", "value": "D"}]}
    path = data_file.parent / "turns.json"
    path.write_text(json.dumps([record]))
    full = make_dataset(path, tokenizer, processor)
    (_, _), (second, _) = full.builder.build(record).encoded.image_spans
    cut = make_dataset(path, tokenizer, processor, max_length=second + 1)[0]
    # The cut falls inside the second image's run: the whole run goes, and so does its image.
    assert len(cut["input_ids"]) == second
    assert cut["input_ids"].tolist().count(IMG) == N_IMAGE_TOKENS
    assert torch.equal(cut["pixel_values"], full[0]["pixel_values"][:1])


def test_real_odd_images(tmp_path, tokenizer, processor, assets):
    odd = ["camera_grayscale.png", "alpaca_rgba.png", "palette_animated.gif", "tiny_1x1.png"]
    records = [{"id": name, "image": name,
                "conversations": _turns("<image>\nWhat?", "A picture")} for name in odd]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = make_dataset(path, tokenizer, processor, image_folder=assets / "images")
    for n in range(len(ds)):
        pixels = ds[n]["pixel_values"]
        assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(pixels).all(), odd[n]


def test_collator_pads_and_concatenates_images(data_file, tokenizer, processor):
    ds = make_dataset(data_file, tokenizer, processor)
    items = [ds[0], ds[by_id("text-only")], ds[by_id("two-images")]]
    lengths = [len(i["input_ids"]) for i in items]
    batch = DataCollator(pad_token_id=PAD)(items)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, item, n in zip(range(3), items, lengths, strict=True):
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == item["labels"].tolist()
        assert (batch["input_ids"][row, n:] == PAD).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    # Only the image samples' pixels, in sample order: 1 + 2 images.
    expected = torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)

    text_batch = DataCollator(pad_token_id=PAD, pad_to_multiple_of=8)([items[1], items[1]])
    assert "pixel_values" not in text_batch
    assert text_batch["input_ids"].shape[1] % 8 == 0


def test_anyres_processor_gives_image_sizes(data_file, tokenizer):
    from transformers import LlavaNextImageProcessorPil

    anyres = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])
    ds = make_dataset(data_file, tokenizer, anyres, aspect="anyres")
    one, two = ds[0], ds[by_id("two-images")]
    # red.png is 40x24 (wide), blue.png 16x30 (tall); image_sizes are (height, width).
    assert one["image_sizes"].tolist() == [[24, 40]]
    assert two["image_sizes"].tolist() == [[24, 40], [30, 16]]
    assert one["pixel_values"].dim() == 5 and two["pixel_values"].shape[0] == 2
    batch = DataCollator(pad_token_id=PAD)([one, ds[by_id("text-only")], two])
    assert batch["pixel_values"].shape[0] == 3
    assert batch["image_sizes"].tolist() == [[24, 40], [24, 40], [30, 16]]


def test_collator_anyres_tiles_and_limits():
    def sample(tiles: int) -> dict:
        return {"input_ids": torch.ones(3, dtype=torch.long), "labels": torch.ones(3).long(),
                "pixel_values": torch.ones(1, tiles, 3, 4, 4),
                "image_sizes": torch.tensor([[4, 8]])}

    batch = DataCollator(pad_token_id=PAD, max_length=4, pad_to_multiple_of=8)(
        [sample(3), sample(2)])
    assert batch["pixel_values"].shape == (2, 3, 3, 4, 4)
    assert batch["pixel_values"][1, 2].abs().sum() == 0  # zero tile padding
    assert batch["image_sizes"].tolist() == [[4, 8], [4, 8]]
    assert batch["input_ids"].shape == (2, 4)  # rounded up to 8, capped at max_length
    with pytest.raises(ValueError, match="more than max_length 2"):
        DataCollator(pad_token_id=PAD, max_length=2)([sample(1)])


def test_fully_masked_sample_is_dropped_and_counted(data_file, tokenizer, processor, caplog):
    ds = make_dataset(data_file, tokenizer, processor, max_length=20)
    with caplog.at_level(logging.WARNING, logger="llava_cli"):
        assert isinstance(ds.inputs_or_drop(by_id("long-prompt")), Dropped)
        assert isinstance(ds.inputs_or_drop(by_id("long-prompt")), Dropped)
    assert ds.dropped.counts == {Problem.FULLY_MASKED: 2}
    assert ds.dropped.examples[Problem.FULLY_MASKED] == ["long-prompt", "long-prompt"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per process, not once per record
    assert "long-prompt" in warnings[0] and "llava inspect-data --check" in warnings[0]


def test_missing_image_raises_or_is_skipped(data_file, tokenizer, processor):
    n = by_id("missing-image")
    with pytest.raises(RecordError, match=r"record 'missing-image'.*nowhere/gone\.png"):
        make_dataset(data_file, tokenizer, processor)[n]
    ds = make_dataset(data_file, tokenizer, processor, skip_bad_records=True)
    assert isinstance(ds.inputs_or_drop(n), Dropped)
    assert ds.dropped.counts == {"bad-image": 1}
    assert ds.dropped.examples == {"bad-image": ["missing-image"]}
    assert "bad-image: 1 (e.g. missing-image)" in ds.dropped.summary()


def test_invalid_json_line_is_a_bad_record(tmp_path, tokenizer, processor):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "ok", "conversations": [{"from": "human", "value": "a"}, '
                    '{"from": "gpt", "value": "b"}]}\n{"id": tru}\n')
    with pytest.raises(RecordError, match="not valid JSON"):
        make_dataset(path, tokenizer, processor)[1]
    ds = make_dataset(path, tokenizer, processor, skip_bad_records=True)
    assert ds[0] is not None and isinstance(ds.inputs_or_drop(1), Dropped)
    assert ds.dropped.counts == {"bad-json": 1}
    # Through __getitem__ a dropped record is replaced by the next usable one: full batches.
    # The item says which record it replaced (the trainer totals these over workers/ranks).
    item = ds[1]
    assert item["record_index"] == 0 and ds.dropped.counts == {"bad-json": 2}
    assert item["dropped"] == [Dropped(1, "bad-json", "#1")]
    assert "dropped" not in ds[0]


def test_unusable_data_is_an_error_not_an_endless_search(data_file, tokenizer, processor):
    ds = make_dataset(data_file, tokenizer, processor, max_length=8, skip_bad_records=True)
    with pytest.raises(ValueError, match="consecutive records from #0 cannot be trained on"):
        ds[0]


def test_collator_passes_on_the_dropped_records_and_counts_are_per_distinct_record():
    row = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6])}
    first, second = Dropped(4, "bad-image", "a"), Dropped(9, Problem.FULLY_MASKED, "b")
    for padding_free in (False, True):
        collate = DataCollator(pad_token_id=PAD, padding_free=padding_free)
        batch = collate([{**row, "dropped": [first]}, row, {**row, "dropped": [second]}])
        assert batch["dropped_records"] == [first, second]
        assert "dropped_records" not in collate([row, row])  # the usual batch: no extra key
    # Dropped again in a later epoch and by another worker: still one record.
    total = ProblemCounter.of_distinct([first, second, first, Dropped(4, "bad-image", "a")])
    assert total.total == 2 and total.counts == {"bad-image": 1, Problem.FULLY_MASKED: 1}
    assert total.summary() == "bad-image: 1 (e.g. a); fully-masked: 1 (e.g. b)"


def test_lengths_come_from_the_index(data_file, tokenizer, processor):
    ds = make_dataset(data_file, tokenizer, processor)
    signs = [int(x > 0) - int(x < 0) for x in ds.modality_lengths]
    assert signs == [1 if "image" in r else -1 for r in RECORDS]
    assert (ds.lengths > 0).all() and len(ds.lengths) == len(ds) == len(RECORDS)


def test_dataloader_workers_match_single_process(data_file, tokenizer, processor, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ds = make_dataset(data_file, tokenizer, processor, skip_bad_records=True)
    collate = DataCollator(pad_token_id=PAD, pad_to_multiple_of=4)

    def batches(workers: int) -> list[dict[str, torch.Tensor]]:
        kwargs = {"multiprocessing_context": "fork"} if workers else {}
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers,
                                             collate_fn=collate, **kwargs)
        return list(loader)

    single, forked = batches(0), batches(2)
    assert len(single) == len(forked) == 3
    for a, b in zip(single, forked, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] if k == "dropped_records" else torch.equal(a[k], b[k])
                   for k in a)
    # Batch 2 held the two-image record and the missing image, which a worker replaced by the
    # next usable (text-only) record: the batch stays full, and it says what it left out.
    assert single[1]["input_ids"].shape[0] == 2
    assert forked[1]["dropped_records"] == [Dropped(by_id("missing-image"), "bad-image",
                                                    "missing-image")]
    assert "dropped_records" not in single[0] and "dropped_records" not in single[2]
    assert single[1]["pixel_values"].shape == (2, 3, 32, 32)
    assert "pixel_values" not in single[2]


def test_batch_runs_through_a_tiny_llava(data_file, tokenizer, processor):
    """The collated batch is what `LlavaForConditionalGeneration` expects (images ↔ tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16,
                                       intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2),
        image_token_id=IMG, vision_feature_layer=-1)
    ds = make_dataset(data_file, tokenizer, processor)
    batch = DataCollator(pad_token_id=PAD)([ds[0], ds[by_id("text-only")], ds[by_id("two-images")]])
    loss = Llava(config).eval()(**batch).loss
    assert torch.isfinite(loss)


def test_image_paths_that_leave_the_folder_are_refused_by_name(tmp_path, tokenizer):
    def builder(folder, allow=False) -> SampleBuilder:
        options = DataOptions(image_folder=folder, allow_images_outside_folder=allow)
        return SampleBuilder(options, InputSpec(tokenizer, IMG, lambda size: 4, (0.5,) * 3))

    inside = builder(str(tmp_path / "img"))
    for relative in ("a.jpg", "sub/../b.jpg", "./c.jpg", str(tmp_path / "img" / "d.jpg")):
        assert inside.confined_image_path("r", relative).startswith(str(tmp_path / "img") + "/")
    # A sibling folder whose name starts the same is outside too.
    for relative in ("../x.jpg", "sub/../../x.jpg", "/etc/passwd", "../img2/x.jpg"):
        with pytest.raises(RecordError) as info:
            inside.confined_image_path("r", relative)
        assert info.value.kind == Problem.IMAGE_OUTSIDE_FOLDER
        assert str(info.value).startswith(f"record 'r': image {relative!r} resolves to ")
    # A symlink inside the folder is followed (image folders are often links to a data disk).
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "linked").symlink_to(tmp_path)
    assert inside.confined_image_path("r", "linked/x.jpg") == str(tmp_path / "img/linked/x.jpg")
    # Allowed, or no folder given (paths resolve against the cwd): nothing is refused.
    assert builder(str(tmp_path / "img"), allow=True).confined_image_path("r", "/x.jpg") == "/x.jpg"
    assert builder(None).confined_image_path("r", "/x.jpg") == "/x.jpg"
    assert builder("/").confined_image_path("r", "/etc/x.jpg") == "/etc/x.jpg"
