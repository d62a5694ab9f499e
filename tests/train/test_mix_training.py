"""`llava finetune` on a two-source mix (the bundled JSON records with their image folder,
and a Parquet file with embedded images): checked before training, trains, saves, reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.data.sources.mix import open_records
from llava_cli.inspect.inspection import demo_data
from tests.helpers import TINY_LLM, TINY_VISION

RECORDS, IMAGES = demo_data()


@pytest.mark.parametrize("packing", ["off", "on"])
def test_finetune_on_a_two_source_mix_trains_and_reloads(tmp_path: Path, packing: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    transformers = pytest.importorskip("transformers")
    demo = json.loads(Path(RECORDS).read_text())
    rows = [{"id": f"embedded-{r['id']}", "conversations": r["conversations"],
             "images": [{"bytes": (Path(IMAGES) / r["image"]).read_bytes(), "path": r["image"]}]}
            for r in demo if isinstance(r.get("image"), str)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "embedded.parquet")
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"seed": 3, "sources": [
        {"name": "demo", "path": RECORDS, "image_folder": IMAGES},
        {"name": "embedded", "path": "embedded.parquet", "repeat": 2}]}))
    index = open_records(mix)
    assert len(index) == len(demo) + 2 * len(rows) and index.read(len(demo)).embedded
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "finetune", "--model-name-or-path", str(TINY_LLM), "--vision-tower", str(TINY_VISION),
        "--tokenizer", "demo", "--random-init", "--data-path", str(mix), "--max-steps", "3",
        "--batch-size", "2", "--packing", packing, "--packing-budget", "128", "-o", str(out)])
    assert result.exit_code == 0, result.output
    # Packs are made from the mix's records (the check's lengths, embedded images included).
    assert ("samples a row" in result.output) == (packing == "on")
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [row["loss"] for row in state["log_history"] if "loss" in row]
    assert state["global_step"] == 3 and losses
    assert "mix.yaml" in (out / "llava_config.yaml").read_text()  # the run names its mix
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.vision_config is not None
    assert transformers.AutoProcessor.from_pretrained(out) is not None


def test_the_pre_training_check_scans_a_mix_and_names_the_source(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        "image": "../bad.jsonl"}) + "\n")
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [
        {"name": "demo", "path": RECORDS, "image_folder": IMAGES},
        {"name": "escapes", "path": "bad.jsonl", "image_folder": "images"}]}))
    # A tower folder with no model in it: the data check comes before the model loads.
    (tmp_path / "no-tower").mkdir()
    result = CliRunner().invoke(app, [
        "finetune", "--model-name-or-path", str(TINY_LLM), "--vision-tower",
        str(tmp_path / "no-tower"), "--tokenizer", "demo", "--random-init", "--data-path",
        str(mix), "--max-steps", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "image-outside-folder: 1 (e.g. escapes#0)" in message[0]
