"""Attacks on what a run writes: --overwrite with a typo, outputs on top of inputs, a previous
run's checkpoints, two runs into one folder, a kill or Ctrl-C during a checkpoint save, a full
disk. Each asserts: a one-line error and no traceback, inputs byte-identical, outputs complete
or absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import demo_sample, tree_digest

RECORDS, IMAGES = demo_sample()

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"
DRIVER = Path(__file__).with_name("interrupt_save.py")


def _finetune_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model-name-or-path", str(model), "--data-path", RECORDS,
            "--image-folder", IMAGES, "-o", str(out), "--batch-size", "2", "--seed", "7",
            "--dataloader-num-workers", "0", *extra]


def _fails_cleanly(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert TRACEBACK not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("llava ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture()
def previous_run(llava_checkpoint, tmp_path) -> Path:
    """A finished finetune run with checkpoints, to be overwritten."""
    out = tmp_path / "run"
    result = runner.invoke(app, _finetune_args(llava_checkpoint, out, "--max-steps", "2",
                                               "--save-steps", "1"))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    return out


def test_overwrite_that_fails_validation_deletes_nothing(previous_run, llava_checkpoint):
    before = tree_digest(previous_run)
    for bad in (["--data-path", str(previous_run.parent / "typo.json")],
                ["--set", "num_train_epochs=banana"],
                ["--model-name-or-path", str(previous_run.parent / "no-such-model")]):
        args = _finetune_args(llava_checkpoint, previous_run, "--overwrite", *bad)
        message = _fails_cleanly(runner.invoke(app, args))
        assert message.startswith("llava finetune: ")
        assert tree_digest(previous_run) == before, bad


@pytest.mark.parametrize("where", ["same", "inside", "around-data", "is-images"])
def test_an_output_dir_overlapping_an_input_is_refused(llava_checkpoint, tmp_path, where):
    data = tmp_path / "data"
    shutil.copytree(IMAGES, data / "images")
    shutil.copy(RECORDS, data / "records.json")
    out = {"same": llava_checkpoint, "inside": llava_checkpoint / "sub",
           "around-data": tmp_path, "is-images": data / "images"}[where]
    before, data_before = tree_digest(llava_checkpoint), tree_digest(data)
    args = _finetune_args(llava_checkpoint, out, "--overwrite", "--max-steps", "1")
    args[args.index(RECORDS)] = str(data / "records.json")
    args[args.index(IMAGES)] = str(data / "images")
    message = _fails_cleanly(runner.invoke(app, args))
    relation = {"same": "is", "inside": "lies inside", "around-data": "contains",
                "is-images": "is"}[where]
    assert f"{relation} the " in message and "apart from every input" in message
    assert tree_digest(llava_checkpoint) == before and tree_digest(data) == data_before
    assert not (llava_checkpoint / "sub").exists()


def test_overwrite_clears_the_previous_runs_checkpoints(previous_run, llava_checkpoint):
    result = runner.invoke(app, _finetune_args(llava_checkpoint, previous_run, "--overwrite",
                                               "--max-steps", "1", "--save-steps", "100"))
    assert result.exit_code == 0, result.output
    # The Trainer saves the last step (checkpoint-1, this run's); the old run's are gone.
    assert [p.name for p in previous_run.glob("checkpoint-*")] == ["checkpoint-1"]
    assert json.loads((previous_run / "checkpoint-1" / "trainer_state.json").read_text())[
        "max_steps"] == 1
    assert not list(previous_run.glob(".*-checkpoint-*")) and not list(
        previous_run.glob(".llava*"))
    manifest = json.loads((previous_run / "llava_run.json").read_text())
    assert set(manifest["files"]) == {p.name for p in previous_run.iterdir()
                                      if not p.name.startswith("checkpoint-")}


def test_resuming_a_finished_run_trains_no_extra_step(previous_run, llava_checkpoint):
    weights = tree_digest(previous_run)["model.safetensors"]
    result = runner.invoke(app, _finetune_args(llava_checkpoint, previous_run, "--resume",
                                               "latest", "--max-steps", "2",
                                               "--save-steps", "1"))
    assert result.exit_code == 0, result.output
    state = json.loads((previous_run / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert len([row for row in state["log_history"] if "loss" in row]) == 2
    assert tree_digest(previous_run)["model.safetensors"] == weights


def test_two_runs_cannot_write_into_one_directory(llava_checkpoint, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from llava_cli.artifacts.output_dir import output_lock\n"
         f"with output_lock(Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = runner.invoke(app, _finetune_args(llava_checkpoint, out, "--max-steps", "1"))
        message = _fails_cleanly(result)
        assert "is in use by another run" in message and f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".llava.lock"]  # the holder's, nothing of ours
    # Once the holder is gone (killed: the system drops its lock), the directory is free.
    result = runner.invoke(app, _finetune_args(llava_checkpoint, out, "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert not (out / ".llava.lock").exists()


def _run_driver(mode: str, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = _finetune_args(model, out, "--max-steps", "6", "--save-steps", "2", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DRIVER), mode, *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize("mode", ["kill", "interrupt"])
def test_a_checkpoint_interrupted_mid_save_never_appears_and_resume_skips_it(
        llava_checkpoint, tmp_path, mode):
    out = tmp_path / "run"
    stopped = _run_driver(mode, llava_checkpoint, out)
    if mode == "kill":
        assert stopped.returncode == -9, stopped.stderr
    else:
        assert stopped.returncode == 130, stopped.stderr
        assert TRACEBACK not in stopped.stderr
        assert stopped.stderr.strip().splitlines()[-1] == "llava finetune: interrupted"
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"]  # checkpoint-4 was being written: not published
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "llava_run.json").exists()  # no final outputs: absent, not partial
    resumed = runner.invoke(app, _finetune_args(llava_checkpoint, out, "--max-steps", "6",
                                                "--save-steps", "2", "--resume", "latest"))
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def _tiny_filesystem_available() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not _tiny_filesystem_available(),
                    reason="needs `unshare` with user namespaces to mount a tiny tmpfs")
def test_a_full_disk_is_one_line_and_leaves_complete_checkpoints_only(llava_checkpoint,
                                                                      tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    size = sum(p.stat().st_size for p in llava_checkpoint.glob("model*.safetensors"))
    args = _finetune_args(llava_checkpoint, mount / "out", "--max-steps", "6",
                          "--save-steps", "2")
    # Room for about one checkpoint (weights + optimizer state ~3x the weights), not two.
    script = (f"mount -t tmpfs -o size={int(size * 5.5)} tmpfs {mount} && "
              f"{sys.executable} -m llava_cli {' '.join(map(repr, args))}; echo rc=$?; "
              f"cd {mount / 'out'} && echo listing: .* * && echo complete: "
              "checkpoint-*/trainer_state.json")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "rc=2" in done.stdout, done.stdout + done.stderr
    assert TRACEBACK not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("llava finetune: no space left on the device"), done.stderr
    listing = done.stdout.split("listing:")[1].split("complete:")[0].split()
    complete = done.stdout.split("complete:")[1].split()
    assert "llava_run.json" not in listing  # outputs absent, not partial
    assert not [name for name in listing if name.startswith((".saving-", ".llava-"))]
    checkpoints = [name for name in listing if name.startswith("checkpoint-")]
    assert checkpoints and complete == [f"{name}/trainer_state.json" for name in checkpoints]
