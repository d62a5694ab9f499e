"""`llava demo --output-dir demo`: an output folder named like the built-in tokenizer. A path
that exists is always read as that path, so the demo names its tokenizer by a folder of its
own, and `--tokenizer demo` beside a folder named `demo` reads that folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
from llava_cli.data.text.tokenizer import load_tokenizer
from llava_cli.demo.pipeline import Demo, DemoPlan, check_output_dir

TINY = DemoPlan(pictures={"pretrain": 6}, steps={"pretrain": 2},
                sets={"pretrain": ("per_device_train_batch_size=2", "save_steps=100",
                                   "dataloader_num_workers=0")})


def test_the_demo_trains_into_a_folder_named_demo(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path("demo")
    check_output_dir(out, overwrite=False)
    demo = Demo(out, TINY, Console(file=open(tmp_path / "log.txt", "w")))  # noqa: SIM115
    demo.generate_data()
    assert "tokenizer=demo/data/tokenizer" in demo.train_sets("pretrain")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        demo.train("pretrain")
    manifest = json.loads((tmp_path / "demo" / "pretrain" / "llava_run.json").read_text())
    assert manifest["kind"] == "projector"
    built_in = build_demo_tokenizer()
    trained = load_tokenizer(str(tmp_path / "demo" / "pretrain"))
    text = "What shape is it? A red square."
    assert trained(text).input_ids == built_in(text).input_ids


def test_a_local_folder_named_demo_is_read_as_that_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert len(load_tokenizer("demo")) == len(build_demo_tokenizer())  # the built-in one
    (tmp_path / "demo").mkdir()
    with pytest.raises(ValueError) as err:
        load_tokenizer("demo")
    assert (f"(the local path {str(tmp_path / 'demo')!r} is read as that path, not as the "
            "built-in demo tokenizer; run from another directory or rename it)") in str(err.value)
    build_demo_tokenizer(vocab_size=300).save_pretrained(str(tmp_path / "demo"))
    assert len(load_tokenizer("demo")) == len(build_demo_tokenizer(vocab_size=300))
