"""Preference data in the form the public sets ship it: RLAIF-V's Parquet columns (`question`,
`chosen`, `rejected`, `image` as {bytes, path}, `image_path`) and TRL's (`prompt`, `chosen`,
`rejected` as text or message lists, `images`), in Parquet files and `datasets` save_to_disk
folders. Each row makes exactly the pair that the same record in a JSON file makes, and
`inspect-data --check` and `llava dpo` read them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.data.preference_pairs import PairBuilder
from llava_cli.data.records import RecordFormatError
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.sources.mix import open_records
from tests.helpers import llama_tokenizer_as_trained

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

CAT = "chelsea_cat.png"
QUESTION = "What animal is in the picture?"
runner = CliRunner()


@pytest.fixture(scope="module")
def pairs(assets) -> PairBuilder:
    builder = SampleBuilder(DataOptions(model_max_length=256),
                            InputSpec(llama_tokenizer_as_trained(assets), 32000, lambda size: 4,
                                      (0.5,) * 3))
    return PairBuilder(builder)


@pytest.fixture
def cat(assets: Path, tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return Path(shutil.copy(assets / "images" / CAT, tmp_path / "images" / CAT))


def _rlaif_rows(cat: Path, n: int = 3) -> list[dict]:
    return [{"ds_name": "RLAIF-V", "image": {"bytes": cat.read_bytes(), "path": f"x/{k}.png"},
             "question": f"{QUESTION} {k}", "chosen": f"A cat {k}.", "rejected": f"A dog {k}.",
             "origin_dataset": "test", "idx": k, "image_path": f"x/{k}.png"}
            for k in range(n)]


def _same_pair(built, expected) -> None:
    assert built.chosen.encoded.input_ids == expected.chosen.encoded.input_ids
    assert built.rejected.encoded.input_ids == expected.rejected.encoded.input_ids
    assert built.chosen.encoded.labels == expected.chosen.encoded.labels
    assert built.rejected.encoded.labels == expected.rejected.encoded.labels
    assert built.image_sizes == expected.image_sizes == [(451, 300)]
    assert all((np.asarray(a) == np.asarray(b)).all()
               for a, b in zip(built.images, expected.images, strict=True))


def _from_file(pairs: PairBuilder, cat: Path, k: int):
    """The pair of the same RLAIF-V record in a JSON file, its image a file."""
    record = {"id": f"r-{k}", "question": f"{QUESTION} {k}", "chosen": f"A cat {k}.",
              "rejected": f"A dog {k}.", "image": str(cat)}
    return pairs.build(record)


@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_rlaif_v_columns_make_the_json_records_pairs(tmp_path: Path, cat: Path, pairs,
                                                     form: str) -> None:
    rows = _rlaif_rows(cat)
    if form == "parquet":
        path = tmp_path / "rlaif.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    else:
        path = tmp_path / "rlaif"
        features = datasets.Dataset.from_list(rows).features.copy()
        features["image"] = datasets.Image()
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))
    index = open_records(path)
    assert len(index) == 3 and index.has_image.tolist() == [True] * 3
    for k in (2, 0):
        _same_pair(pairs.build(index.read(k), k), _from_file(pairs, cat, k))


def test_rlaif_v_rows_with_only_an_image_path(tmp_path: Path, cat: Path, pairs) -> None:
    rows = [{k: v for k, v in row.items() if k != "image"} for row in _rlaif_rows(cat)]
    for k, row in enumerate(rows):
        row["image_path"] = CAT if k != 1 else None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paths.parquet")
    index = open_records(tmp_path / "paths.parquet")
    assert index.has_image.tolist() == [True, False, True]
    builder = PairBuilder(SampleBuilder(DataOptions(model_max_length=256,
                                                    image_folder=str(cat.parent)),
                                        pairs.builder.spec))
    _same_pair(builder.build(index.read(2), 2), _from_file(pairs, cat, 2))
    assert builder.build(index.read(1), 1).image_sizes == []


def _trl_rows(cat: Path, messages: bool) -> list[dict]:
    rows = []
    for k in range(3):
        if messages:
            prompt = [{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": f"{QUESTION} {k}"}]}]
            chosen = [{"role": "assistant", "content": [{"type": "text", "text": f"A cat {k}."}]}]
            rejected = [{"role": "assistant",
                         "content": [{"type": "text", "text": f"A dog {k}."}]}]
        else:
            prompt, chosen, rejected = f"<image>\n{QUESTION} {k}", f"A cat {k}.", f"A dog {k}."
        rows.append({"images": [{"bytes": cat.read_bytes(), "path": None}], "prompt": prompt,
                     "chosen": chosen, "rejected": rejected})
    return rows


@pytest.mark.parametrize("messages", [True, False])
@pytest.mark.parametrize("form", ["parquet", "save_to_disk"])
def test_trl_columns_make_the_json_records_pairs(tmp_path: Path, cat: Path, pairs,
                                                 messages: bool, form: str) -> None:
    rows = _trl_rows(cat, messages)
    features = datasets.Dataset.from_list(rows).features.copy()
    features["images"] = datasets.Sequence(datasets.Image())
    table = datasets.Dataset.from_list(rows, features=features)
    path = tmp_path / ("trl.parquet" if form == "parquet" else "trl")
    table.to_parquet(str(path)) if form == "parquet" else table.save_to_disk(str(path))
    index = open_records(path)
    assert len(index) == 3 and index.has_image.tolist() == [True] * 3
    for k in (1, 2):
        _same_pair(pairs.build(index.read(k), k), _from_file(pairs, cat, k))


def test_inspect_data_checks_preference_tables(tmp_path: Path, cat: Path) -> None:
    pq.write_table(pa.Table.from_pylist(_rlaif_rows(cat)), tmp_path / "rlaif.parquet")
    result = runner.invoke(app, ["inspect-data", str(tmp_path / "rlaif.parquet"), "--demo",
                                 "--check", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["record_kind"] == "preference" and report["ok"] is True
    assert (report["records"], report["image_records"], report["problems"]) == (3, 3, {})


def test_dpo_trains_on_an_rlaif_v_parquet_file(tmp_path_factory, tmp_path: Path) -> None:
    from llava_cli.demo.shapes import generate_split
    from tests.helpers import tiny_finetune_output

    root = tmp_path_factory.mktemp("tables-dpo")
    model = tiny_finetune_output(root)
    records = json.loads(generate_split(root / "dpo", 4, 0, "dpo").read_text())
    rows = [{"idx": n, "question": record["conversations"][0]["value"].replace("<image>\n", ""),
             "chosen": record["chosen"], "rejected": record["rejected"],
             "image": {"bytes": (root / "dpo" / record["image"]).read_bytes(),
                       "path": record["image"]},
             "image_path": record["image"]} for n, record in enumerate(records)]
    data = tmp_path / "rlaif.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "dpo", "--model-name-or-path", str(model), "--data-path", str(data), "--lora",
        "--lora-r", "4", "--max-steps", "2", "--batch-size", "2", "--output-dir", str(out),
        "--set", "dataloader_num_workers=0", "--set", "logging_steps=1"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")  # LoRA B starts at zero: trained
    assert any("lora_B" in key and value.abs().sum() > 0 for key, value in adapter.items())


def test_a_table_with_replies_but_no_prompt_is_named(tmp_path: Path) -> None:
    path = tmp_path / "half.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": "a", "rejected": "b", "x": 1}]), path)
    with pytest.raises(RecordFormatError) as err:
        open_records(path)
    assert str(err.value) == (f"{path}: preference columns chosen and rejected but no prompt "
                              "column (columns: chosen, rejected, x); give `conversations`, "
                              "`prompt` or `question`")
    path = tmp_path / "none.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": "a", "x": 1}]), path)
    with pytest.raises(RecordFormatError, match="no conversations or preference columns"):
        open_records(path)
