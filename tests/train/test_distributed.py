"""Real multi-process training on CPU: 2 ranks over gloo with torchrun, for DDP and DeepSpeed.

Each run starts from the same tiny finetuned base and the same perturbed projector file, with the
same seed, data and global batch (2 ranks × 2). That makes the strategies comparable with each
other: DDP, ZeRO-2 and ZeRO-3 must log the same losses and end with the same weights (to float
tolerance). It is the meaningful form of "the ranks agree": the Trainer all-reduces the loss
before logging and only rank 0 writes `trainer_state.json`, so per-rank loss lines do not exist.

"The trained model" lives in the subprocess; our reference for it is DeepSpeed's own fp32 master
weights, consolidated from the ZeRO checkpoint of the final step (`zero_to_fp32`). The saved
output, reloaded in this process with plain transformers (no DeepSpeed config anywhere), must
equal them and give the same logits.

The 2-process runs take ~25-35 s each on 2 cores (≈7 s of imports per process), so they are
marked slow (`pytest -m slow`). `bench/gpu_smoke.py --tiny` is tested here too, unmarked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava_cli.artifacts.projector_file import (
    PROJECTOR_PREFIX,
    read_projector_file,
    write_projector_file,
)
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.projector import projector_state
from tests import helpers
from tests.helpers import PLAIN_SCHEDULE
from tests.helpers import eval_logits as _logits
from tests.helpers import probe_batch as _probe

ROOT = Path(__file__).resolve().parents[2]
RECORDS, IMAGES = demo_data()
ZERO2, ZERO3 = (str(ROOT / "recipes" / "deepspeed" / f"zero{n}.json") for n in (2, 3))
STEPS = 4  # checkpoints at 2 and 4 (save_steps 2): resume from 2, consolidate 4
PERTURB = 0.5  # added to every projector tensor of the base to make the imported projector


_launcher = helpers.torchrun_launcher


@pytest.fixture(scope="module")
def base(finetuned_base_dir, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny finetuned LLaVA (`finetuned_base_dir`) and a perturbed projector file."""
    root = tmp_path_factory.mktemp("dist")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(finetuned_base_dir)
    with torch.no_grad():  # a projector unlike the base's: a run that ignored it is detectable
        for param in model.model.multi_modal_projector.parameters():
            param.add_(PERTURB)
    write_projector_file(projector_state(model), root / "projector.safetensors")
    return {"base": finetuned_base_dir, "projector": root / "projector.safetensors", "root": root}


Run = helpers.Run


def launch(base: dict[str, Path], out: Path, *extra: str, stage: str = "finetune",
           overwrite: bool = True) -> Run:
    """Two ranks on gloo from the shared base; fails the test with the ranks' logs on error."""
    import time

    logs = out.parent / f"{out.name}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    command = [*_launcher(), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
               "--redirects", "3", "-m", "llava_cli", stage,
               "--model-name-or-path", str(base["base"]), "--data-path", RECORDS,
               "--image-folder", IMAGES, "--batch-size", "2", "--max-steps", str(STEPS),
               "--save-steps", "2", "--lr", "1e-2", "--seed", "7",
               *(f"--{k.replace('_', '-')}={v}" for k, v in PLAIN_SCHEDULE.items()),
               "-o", str(out), *extra]
    if overwrite:
        command.append("--overwrite")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    run = Run(out, logs, time.perf_counter() - start)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}\n"
                    f"--- rank 0 ---\n{run.rank_log(0)[-3000:]}\n"
                    f"--- rank 1 ---\n{run.rank_log(1)[-3000:]}")
    print(f"{out.name}: {run.seconds:.1f} s")  # shown with -s / -rP: CI timing at a glance
    return run


@pytest.fixture(scope="module")
def ddp(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("ddp") / "out", "--pretrained-projector",
                  str(base["projector"]))


@pytest.fixture(scope="module")
def zero2(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("zero2") / "out", "--pretrained-projector",
                  str(base["projector"]), "--deepspeed", ZERO2)


@pytest.fixture(scope="module")
def zero3(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("zero3") / "out", "--pretrained-projector",
                  str(base["projector"]), "--deepspeed", ZERO3)


consolidated = helpers.consolidated
_from_state = helpers.model_from_state
_plain = helpers.plain_model
_assert_quiet_other_rank = helpers.assert_quiet_other_rank
_assert_no_placeholders = helpers.assert_no_placeholders


def _assert_same_run(run: Run, reference: Run) -> None:
    """Same losses and the same final weights as another strategy's run of the same job."""
    assert torch.allclose(torch.tensor(run.losses), torch.tensor(reference.losses), rtol=1e-4)
    a = load_file(str(run.output_dir / "model.safetensors"))
    b = load_file(str(reference.output_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_ddp_trains_one_job_on_two_ranks(ddp, base):
    state = ddp.state
    assert state["global_step"] == STEPS and len(ddp.losses) == STEPS
    assert torch.isfinite(torch.tensor(ddp.losses)).all()
    # 5 records at a global batch of 4 (2 ranks × 2): 2 steps per epoch. One process alone
    # (the silent failure without use_cpu) would need 3 at batch 2.
    assert state["log_history"][0]["epoch"] == 0.5
    _assert_quiet_other_rank(ddp)
    _assert_no_placeholders(ddp.output_dir / "model.safetensors",
                            base["base"] / "model.safetensors")
    # The final checkpoint and the output are the same weights.
    final = load_file(str(ddp.output_dir / f"checkpoint-{STEPS}" / "model.safetensors"))
    output = load_file(str(ddp.output_dir / "model.safetensors"))
    assert all(torch.equal(final[k], output[k]) for k in output)
    manifest = json.loads((ddp.output_dir / "llava_run.json").read_text())
    assert manifest["kind"] == "full"


@pytest.mark.slow
def test_the_feature_cache_trains_as_without_it_on_two_ranks(ddp, base, tmp_path):
    """Both ranks share one cache directory (atomic entries); DDP and ZeRO-2 still reduce the
    projector's gradients when it runs outside the wrapped model's forward. The cold run (DDP)
    fills the cache, the warm run (ZeRO-2) only reads it: the projector runs outside the forward
    on both paths, so each strategy walks one (one launch each instead of two)."""
    cache = str(tmp_path / "cache")
    cached = [launch(base, tmp_path / name, "--pretrained-projector", str(base["projector"]),
                     "--vision-feature-cache", cache, *extra)
              for name, extra in (("cold-ddp", ()), ("warm-zero2", ("--deepspeed", ZERO2)))]
    for run in cached:
        _assert_same_run(run, ddp)
    metrics = [json.loads((run.output_dir / "train_results.json").read_text()) for run in cached]
    assert metrics[0]["vision_feature_cache_misses"] > 0
    assert metrics[1]["vision_feature_cache_misses"] == 0  # rank 0's count
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def _assert_output_is_the_trained_model(run: Run) -> None:
    helpers.assert_output_is_the_trained_model(run, STEPS)


@pytest.mark.slow
def test_zero2_equals_ddp_and_saves_a_plain_checkpoint(zero2, ddp, base):
    assert zero2.state["global_step"] == STEPS
    assert torch.isfinite(torch.tensor(zero2.losses)).all()
    _assert_quiet_other_rank(zero2)
    _assert_no_placeholders(zero2.output_dir / "model.safetensors",
                            base["base"] / "model.safetensors")
    _assert_same_run(zero2, ddp)
    _assert_output_is_the_trained_model(zero2)


@pytest.mark.slow
def test_zero3_full_imports_the_projector_and_saves_gathered_weights(zero3, ddp, base):
    assert zero3.state["global_step"] == STEPS
    assert torch.isfinite(torch.tensor(zero3.losses)).all()
    _assert_quiet_other_rank(zero3)
    # Partitioned parameters were gathered for every save: full shapes in output and checkpoint.
    for folder in (zero3.output_dir, zero3.output_dir / f"checkpoint-{STEPS}"):
        _assert_no_placeholders(folder / "model.safetensors", base["base"] / "model.safetensors")
    # It started from the imported projector: 4 Adam steps at lr 1e-2 move a weight by < 0.05,
    # while the file differs from the base by 0.5 everywhere.
    imported = read_projector_file(base["projector"])
    trained = load_file(str(zero3.output_dir / "model.safetensors"))
    for key, tensor in imported.items():
        moved = (trained[PROJECTOR_PREFIX + key] - tensor).abs()
        assert 0 < moved.max() < 0.1, key
    # And the same job under DDP (no partitioning) logs the same losses from step 1 on.
    _assert_same_run(zero3, ddp)
    _assert_output_is_the_trained_model(zero3)
    manifest = json.loads((zero3.output_dir / "llava_run.json").read_text())
    assert manifest["base"]["pretrained_projector"] == str(base["projector"].resolve())


@pytest.mark.slow
def test_zero3_resume_continues_at_the_checkpoint_step(zero3, base, tmp_path):
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(zero3.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = launch(base, resumed_dir, "--pretrained-projector", str(base["projector"]),
                     "--deepspeed", ZERO3, "--resume", "latest", overwrite=False)
    assert resumed.state["global_step"] == STEPS
    logged_steps = [row["step"] for row in resumed.state["log_history"] if "loss" in row]
    assert logged_steps == list(range(1, STEPS + 1))  # 1-2 from the checkpoint, 3-4 trained
    assert torch.allclose(torch.tensor(resumed.losses), torch.tensor(zero3.losses), rtol=1e-5)
    a = load_file(str(zero3.output_dir / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_zero3_lora_saves_a_full_shape_adapter(base, tmp_path):
    from peft import PeftModel

    run = launch(base, tmp_path / "lora", "--lora", "--lora-r", "8", "--lora-alpha", "16",
                 "--deepspeed", ZERO3, stage="lora")
    assert run.state["global_step"] == STEPS
    assert torch.isfinite(torch.tensor(run.losses)).all()
    _assert_quiet_other_rank(run)
    adapter = load_file(str(run.output_dir / "adapter_model.safetensors"))
    assert not (run.output_dir / "model.safetensors").exists()
    lora_a = {k: v for k, v in adapter.items() if "lora_A" in k}
    assert lora_a and not any("vision_tower" in k for k in adapter)
    for key, tensor in adapter.items():
        assert tensor.numel() > 0 and torch.isfinite(tensor).all(), key
    assert all(v.shape[0] == 8 for v in lora_a.values())
    # The adapter holds the trained values: DeepSpeed's consolidated masters, renamed.
    masters = consolidated(run.output_dir / f"checkpoint-{STEPS}")
    for key, tensor in adapter.items():
        live = (key.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight")
                .replace(PROJECTOR_PREFIX, PROJECTOR_PREFIX + "modules_to_save.default."))
        assert torch.equal(tensor, masters[live]), key
    projector = {k.split(PROJECTOR_PREFIX, 1)[1]: v for k, v in adapter.items()
                 if PROJECTOR_PREFIX in k}
    start = load_file(str(base["base"] / "model.safetensors"))
    assert {k: v.shape for k, v in projector.items()} == {
        k: start[PROJECTOR_PREFIX + k].shape for k in projector}
    # Base + adapter with stock transformers/PEFT in this process == base + masters.
    reloaded = PeftModel.from_pretrained(_plain(base["base"]), run.output_dir)
    batch = _probe(transformers.AutoProcessor.from_pretrained(run.output_dir))
    expected = PeftModel.from_pretrained(_plain(base["base"]), run.output_dir)
    missing, unexpected = expected.load_state_dict(masters, strict=False)
    assert not unexpected
    assert torch.equal(_logits(reloaded, batch), _logits(expected, batch))
    assert not torch.equal(_logits(reloaded, batch), _logits(_plain(base["base"]), batch))


def _gpu_smoke(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--tiny",
                           "--steps", "2", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_smoke_script_runs_tiny_on_cpu(tmp_path):
    """Every lever off alone, all on, all off, LoRA; the levers keep the loss; the figures and
    their formula are printed and written."""
    out = _gpu_smoke("--variants", "full,lora", "--json", str(tmp_path / "smoke.json"))
    assert "MFU = model FLOPs per step" in out and "peak 1 TFLOP/s" in out
    phases = ["all on", "no supervised logits", "no packing", "no frozen no backward",
              "no checkpointing", "all off"]
    for variant, names in (("full", phases), ("lora", ["all on", "all off"])):
        check = next(ln for ln in out.splitlines() if ln.startswith(f"{variant}: same loss"))
        assert float(check.split("(Δ ")[1].rstrip(")")) < 1e-3, check
        for name in names:
            row = next(ln for ln in out.splitlines() if ln.startswith(f"{variant}: {name}:"))
            assert "samples/s" in row and "tokens/s" in row and "MFU" in row
            assert ("× all on)" in row) == (name != "all on")
        packed = next(ln for ln in out.splitlines() if ln.startswith(f"{variant}: all on:"))
        padded = next(ln for ln in out.splitlines() if ln.startswith(f"{variant}: all off:"))
        assert "rows 2×" in packed and "rows 4×" in padded  # 4 samples: 2 packed rows
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert len(written) == 8 and all(r["mfu"] > 0 for r in written)


@pytest.mark.slow
def test_gpu_smoke_zero3_runs_tiny_on_cpu():
    out = _gpu_smoke("--variants", "zero3")
    row = next(ln for ln in out.splitlines() if ln.startswith("zero3: all on:"))
    assert "tokens/s" in row and "MFU" in row


@pytest.mark.slow
def test_zero3_offload_keeps_the_trainers_lr_schedule(base, tmp_path):
    """The offload recipe has no "scheduler" block: the Trainer's cosine-with-warmup must drive
    the LR (a DeepSpeed WarmupLR would ramp and then stay flat). One process is enough."""
    out = tmp_path / "offload"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # no launcher: the CLI sets up a one-process world itself
    done = subprocess.run(
        [sys.executable, "-m", "llava_cli", "finetune", "--model-name-or-path",
         str(base["base"]), "--data-path", RECORDS, "--image-folder", IMAGES, "--batch-size",
         "1", "--max-steps", "8", "--save-steps", "100", "--lr", "1e-2", "--warmup-ratio",
         "0.25", "--lr-scheduler-type", "cosine", "--deepspeed",
         str(ROOT / "recipes" / "deepspeed" / "zero3_offload.json"), "-o", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [row["learning_rate"] for row in state["log_history"] if "learning_rate" in row]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = transformers.get_scheduler("cosine", optimizer, num_warmup_steps=2,
                                          num_training_steps=8)
    expected = []
    for _ in range(8):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(expected, abs=1e-9)


# --- cross-sample packing on two ranks --------------------------------------------------------

PACKING = ("--packing", "on", "--packing-budget", "100")


@pytest.fixture(scope="module")
def ddp_packed(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("ddp-packed") / "out", *PACKING)


@pytest.mark.slow
def test_packed_ranks_train_as_the_same_packs_padded(ddp_packed, base, tmp_path):
    """Both ranks made the same packs from rank 0's lengths (else DDP would hang or the
    padded twin would differ); packed rows give the padded rows' losses and weights, under
    DDP and ZeRO-3 alike."""
    padded = launch(base, tmp_path / "padded", *PACKING, "--set", "packing_layout=padded")
    assert ddp_packed.state["global_step"] == STEPS
    _assert_quiet_other_rank(ddp_packed)
    _assert_same_run(ddp_packed, padded)
    assert "packing" in ddp_packed.rank_log(0) and "samples a row" in ddp_packed.rank_log(0)
    zero3 = launch(base, tmp_path / "zero3", *PACKING, "--deepspeed", ZERO3)
    _assert_same_run(zero3, ddp_packed)
