"""Arrow (save_to_disk), Parquet and WebDataset sources, alone and in a mix: exact records,
both column layouts, embedded images giving the same pixels as the file, per-source image
folders confining their images, and DataLoader workers reading a mix."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from llava_cli.data.conversation import RecordError
from llava_cli.data.dataset import LazySupervisedDataset
from llava_cli.data.images import ImageError
from llava_cli.data.problems import Problem
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.sources.embedded import check_image_bytes
from llava_cli.data.sources.mix import MixIndex, open_records
from llava_cli.data.sources.record import SourceRecord
from tests.data.mixdata import png_bytes, records, turns, write_jsonl, write_tar
from tests.helpers import llama_tokenizer_as_trained

IMG = 32000
CAT = "chelsea_cat.png"  # 451×300: not square, so padding shows in the pixels


@pytest.fixture(scope="module")
def tokenizer(assets):
    return llama_tokenizer_as_trained(assets)


def _builder(tokenizer, folder=None) -> SampleBuilder:
    return SampleBuilder(DataOptions(image_folder=folder, model_max_length=256),
                         InputSpec(tokenizer, IMG, lambda size: 4, (0.5,) * 3))


@pytest.fixture
def cat(assets: Path, tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return Path(shutil.copy(assets / "images" / CAT, tmp_path / "images" / CAT))


def _chat(k: int, parts: bool) -> list[dict]:
    user = [{"type": "image", "text": None}, {"type": "text", "text": f"question {k}"}] \
        if parts else f"<image>\nquestion {k}"
    reply = [{"type": "text", "text": f"answer {k}"}] if parts else f"answer {k}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_arrow_folder_with_llava_columns(tmp_path: Path, cat: Path, tokenizer) -> None:
    datasets = pytest.importorskip("datasets")
    rows = records("arrow", 5, image=CAT) + records("text", 2)
    for row in rows:
        row.setdefault("image", None)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    index = open_records(tmp_path / "saved")
    assert isinstance(index, MixIndex) and len(index) == 7
    assert [index.read(i)["id"] for i in range(7)] == [r["id"] for r in rows]
    assert index.read(0)["image"] == [CAT] and "image" not in index.read(6)
    assert index.read(0)["conversations"] == rows[0]["conversations"]
    assert index.has_image.tolist() == [True] * 5 + [False] * 2
    sample = _builder(tokenizer, str(cat.parent)).build(index.read(0))
    assert sample.image_sizes == [(451, 300)]
    assert open_records(tmp_path / "saved").from_cache  # the column scan is cached


def _pixels(builder: SampleBuilder, record) -> np.ndarray:
    return np.asarray(builder.build(record).images[0])


@pytest.mark.parametrize("parts", [True, False])
def test_messages_layout_with_embedded_images(tmp_path: Path, cat: Path, tokenizer,
                                              parts: bool) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"m-{k}", "messages": _chat(k, parts),
             "images": [{"bytes": cat.read_bytes(), "path": CAT}]} for k in range(3)]
    features = datasets.Dataset.from_list(rows).features.copy()
    features["images"] = datasets.Sequence(datasets.Image())
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "chat"))
    record = open_records(tmp_path / "chat").read(1)
    assert record["conversations"] == turns("<image>\nquestion 1", "answer 1")
    assert isinstance(record, SourceRecord) and record.embedded
    # The same image from its file: the same pixels after the same preparation.
    from_file = {"id": "f", "image": CAT, "conversations": turns("<image>\nq", "a")}
    builder = _builder(tokenizer, str(cat.parent))
    assert (_pixels(builder, record) == _pixels(builder, from_file)).all()
    assert builder.build(record, header_only=True).image_sizes == [(451, 300)]


def test_parquet_row_groups_and_raw_bytes(tmp_path: Path, cat: Path, tokenizer) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"id": f"p-{k}", "image": cat.read_bytes() if k % 2 else None,
             "conversations": turns(("<image>\n" if k % 2 else "") + f"q{k}", f"a{k}")}
            for k in range(7)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet", row_group_size=2)
    index = open_records(tmp_path / "data.parquet")
    order = [5, 0, 6, 3, 1]  # across row groups, back and forth
    assert [index.read(i)["id"] for i in order] == [f"p-{i}" for i in order]
    assert index.has_image.tolist() == [bool(k % 2) for k in range(7)]
    builder = _builder(tokenizer)
    from_file = {"id": "f", "image": str(cat), "conversations": turns("<image>\nq", "a")}
    assert (_pixels(builder, index.read(3)) == _pixels(builder, from_file)).all()


def test_tar_shards(tmp_path: Path, cat: Path, tokenizer) -> None:
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        samples = [(f"s{shard}-{k}", {"id": f"t{shard}-{k}", "conversations":
                                      turns("<image>\nq" if k != 2 else "q", "a")},
                    cat.read_bytes() if k != 2 else None) for k in range(3)]
        write_tar(tmp_path / "shards" / f"part-{shard}.tar", samples)
    index = open_records(str(tmp_path / "shards" / "*.tar"))
    assert [index.read(i)["id"] for i in range(6)] == [f"t{s}-{k}" for s in (0, 1)
                                                       for k in range(3)]
    assert index.has_image.tolist() == [True, True, False] * 2
    builder = _builder(tokenizer)
    from_file = {"id": "f", "image": str(cat), "conversations": turns("<image>\nq", "a")}
    assert (_pixels(builder, index.read(4)) == _pixels(builder, from_file)).all()
    assert open_records(str(tmp_path / "shards" / "*.tar")).from_cache  # headers read once
    assert len(open_records(tmp_path / "shards")) == 6  # a folder of shards: the same


def test_a_tar_sample_without_its_record_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    with tarfile.open(tmp_path / "orphan.tar", "w") as tar:
        info = tarfile.TarInfo("k.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"..."))
    with pytest.raises(ValueError, match="sample 'k' has no k.json member"):
        open_records(tmp_path / "orphan.tar")


def test_each_source_confines_images_to_its_own_folder(tmp_path: Path, cat: Path,
                                                       tokenizer) -> None:
    (tmp_path / "other").mkdir()
    shutil.copy(cat, tmp_path / "other" / "cat2.png")
    write_jsonl(tmp_path / "a.jsonl", records("a", 1, image=CAT) + records("esc", 1,
                image="../other/cat2.png"))
    write_jsonl(tmp_path / "b.jsonl", records("b", 1, image="cat2.png"))
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"sources": [
        {"path": "a.jsonl", "image_folder": "images"}, {"path": "b.jsonl"}]}))
    index = open_records(tmp_path / "mix.yaml")
    builder = _builder(tokenizer, str(tmp_path / "other"))  # the run's folder
    assert builder.build(index.read(0), header_only=True).image_sizes == [(451, 300)]
    with pytest.raises(RecordError) as info:
        builder.build(index.read(1), header_only=True)
    assert info.value.kind == Problem.IMAGE_OUTSIDE_FOLDER
    assert str(tmp_path / "images") in str(info.value)
    # No image_folder on the source: the run's image folder applies.
    assert builder.build(index.read(2), header_only=True).image_sizes == [(451, 300)]
    # A plain JSON record cannot claim a folder or bytes: only attributes of a SourceRecord.
    forged = {"id": "f", "image": "../other/cat2.png", "image_folder": "/",
              "embedded": {"../other/cat2.png": b"x"}, "conversations": turns("<image>", "a")}
    with pytest.raises(RecordError):
        _builder(tokenizer, str(tmp_path / "images")).build(forged, header_only=True)


def test_embedded_bytes_checks(cat: Path) -> None:
    data = cat.read_bytes()
    assert check_image_bytes(data, label="x") == (451, 300)
    assert check_image_bytes(data, label="x", full=True) == (451, 300)
    with pytest.raises(ImageError, match="cannot be decoded"):
        check_image_bytes(b"not an image", label="bad")
    with pytest.raises(ImageError):
        check_image_bytes(data[: len(data) // 2], label="cut")  # truncated: no end marker
    assert check_image_bytes(png_bytes((7, 3)), label="small") == (7, 3)


def test_dataloader_workers_read_a_mix(tmp_path: Path, cat: Path, tokenizer) -> None:
    import torch
    from transformers import CLIPImageProcessorPil

    write_jsonl(tmp_path / "a.jsonl", records("a", 6, image=CAT) + records("t", 3))
    write_tar(tmp_path / "b.tar", [(f"k{k}", {"id": f"b-{k}", "conversations":
                                              turns("<image>\nq", f"a{k}")}, cat.read_bytes())
                                   for k in range(5)])
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({"sources": [
        {"path": "a.jsonl", "image_folder": "images", "repeat": 0.5}, {"path": "b.tar"}]}))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                      crop_size={"height": 32, "width": 32})
    dataset = LazySupervisedDataset.open(tmp_path / "mix.yaml", _builder(tokenizer),
                                         processor)
    assert len(dataset) == 4 + 5  # round(0.5 × 9) = 4 (half to even), then the shard
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         collate_fn=lambda item: item)
    items = list(loader)
    assert [item["record_index"] for item in items] == list(range(len(dataset)))
    for item in items:
        here = dataset[item["record_index"]]
        assert torch.equal(item["input_ids"], here["input_ids"])
        assert ("pixel_values" in item) == ("pixel_values" in here)
        if "pixel_values" in item:
            assert torch.equal(item["pixel_values"], here["pixel_values"])
    assert sum("pixel_values" in item for item in items) >= 5
