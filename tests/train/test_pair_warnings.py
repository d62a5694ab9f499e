"""What the check before training says about data that trains on little: dpo's weak pairs
(the same reply twice, an empty reply, a truncated pair), records longer than the packing
budget, RLAIF-V's `image_path` records counted as image records, and the `inspect-data`
command that the bad-data error suggests, which runs as printed."""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.data.dataset import LazySupervisedDataset
from llava_cli.data.records import RecordIndex
from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.train.stages import preference, supervised
from tests.data.mixdata import png_bytes, records, turns
from tests.helpers import TINY_LLM, llama_tokenizer_as_trained

runner = CliRunner()


def _config(stage: str, tmp_path: Path, data: Path, **keys):
    flags = {"model_name_or_path": str(TINY_LLM), "tokenizer": "demo",
             "data_path": str(data), "image_folder": str(tmp_path / "images"),
             "output_dir": str(tmp_path / "out"), **keys}
    return resolve_config(stage, flags=flags)


def _pairs(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    rows = [{"id": f"p{k}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}],
        "chosen": "A square.", "rejected": "A circle."} for k in range(5)]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[3]["rejected"] = rows[3]["chosen"] = "Same."
    rows[2]["rejected"] = ""
    rows[4]["chosen"] = "long " * 400
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    return data


def test_dpo_check_warns_about_weak_pairs(tmp_path: Path, caplog) -> None:
    # the check counts 576 image tokens (LLaVA-1.5's) for a model it has not loaded
    config = _config("dpo", tmp_path, _pairs(tmp_path), model_max_length=800)
    with caplog.at_level(logging.WARNING, logger="llava_cli"):
        preference.check_data(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "llava_cli"]
    data = config.data_path
    assert len(lines) == 3, lines
    assert lines[0].startswith(
        f"dpo data {data}: 2 pair(s) have the same chosen and rejected reply (the pair teaches "
        "nothing: its DPO gradient is zero); the first: record 'p1'.")
    assert lines[1].startswith(f"dpo data {data}: 1 pair(s) have an empty chosen or rejected "
                               "reply; the first: record 'p2'.")
    assert lines[2].startswith(f"dpo data {data}: 1 pair(s) are cut to model_max_length")
    assert "record 'p4'" in lines[2] and "inspect-data" in lines[2]


def test_inspect_data_check_names_the_same_replies(tmp_path: Path) -> None:
    data = _pairs(tmp_path)
    result = runner.invoke(app, ["inspect-data", str(data), "--tokenizer", "demo", "--check",
                                 "--image-folder", str(tmp_path / "images"), "--format",
                                 "json"])
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["warnings"] == {"same-replies": 2, "empty-reply": 1}
    assert report["examples"]["same-replies"] == ["p1", "p3"]


def test_the_suggested_check_command_runs_as_printed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    rows = records("r", 3, image="a.png")
    rows[1]["image"] = "gone.png"
    Path("data.json").write_text(json.dumps(rows))
    config = resolve_config("finetune", flags={
        "model_name_or_path": str(TINY_LLM), "tokenizer": "demo", "data_path": "data.json",
        "image_folder": "images", "output_dir": "out"})
    with pytest.raises(ValueError) as err:
        supervised.check_data(config)
    command = re.search(r"`(llava inspect-data [^`]*)` lists them all", str(err.value))
    assert command, str(err.value)
    argv = shlex.split(command.group(1))
    assert argv[:4] == ["llava", "inspect-data", "data.json", "--check"]
    result = runner.invoke(app, [*argv[1:], "--format", "json"])
    assert result.exit_code == 1, result.output  # it runs, and finds the bad record
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["problems"] == {"bad-image": 1} and report["examples"]["bad-image"] == ["r-1"]


def test_records_longer_than_the_packing_budget_are_said(tmp_path: Path, caplog,
                                                        assets: Path) -> None:
    data = tmp_path / "text.json"
    data.write_text(json.dumps([{"id": f"t{k}", "conversations": turns("q", "a " * (5 * k))}
                                for k in range(4)]))
    builder = SampleBuilder(DataOptions(model_max_length=512),
                            InputSpec(llama_tokenizer_as_trained(assets), 32000, lambda size: 4,
                                      (0.5,) * 3))
    dataset = LazySupervisedDataset.open(data, builder)
    config = _config("finetune", tmp_path, data, packing="on", packing_budget=20)
    lengths = np.array([12, 18, 25, 33])
    with caplog.at_level(logging.WARNING, logger="llava_cli"):
        packs = supervised.packed(dataset, config, lengths)
    assert len(packs) == 4  # 12 + 18 > 20: every record alone
    assert [r.getMessage() for r in caplog.records if r.name == "llava_cli"] == [
        "packing: 2 record(s) are longer than the packing budget of 20 tokens (the longest: "
        "33 tokens, record #3); each is a pack of its own. Raise --packing-budget to at least "
        "33 to pack them with others."]


def test_rlaif_v_image_path_records_are_image_records(tmp_path: Path) -> None:
    rows = [{"idx": 0, "question": "q", "chosen": "a", "rejected": "b", "image_path": "a.png"},
            {"idx": 1, "question": "q", "chosen": "a", "rejected": "b"},
            {"idx": 2, "question": "q", "chosen": "a", "rejected": "b", "image": None,
             "image_path": "a.png"}]  # "image" decides when it is there
    for name, text in (("rlaif.json", json.dumps(rows)),
                       ("rlaif.jsonl", "".join(json.dumps(r) + "\n" for r in rows))):
        (tmp_path / name).write_text(text)
        index = RecordIndex.open(tmp_path / name, cache_dir=tmp_path / "cache")
        assert index.has_image.tolist() == [True, False, False], name
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    result = runner.invoke(app, ["inspect-data", str(tmp_path / "rlaif.json"), "--tokenizer",
                                 "demo", "--check", "--image-folder", str(tmp_path / "images"),
                                 "--format", "json"])
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert (report["image_records"], report["text_only_records"]) == (1, 2), report
