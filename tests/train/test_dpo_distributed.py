"""`llava dpo` on 2 ranks over gloo (torchrun): DDP, ZeRO-2 and ZeRO-3 from real weights.

Every run starts from the same tiny finetuned base, saved to disk and loaded back with
`from_pretrained` (real weights, not a random init), with the same seed, preference pairs
and global batch (2 ranks × 2 pairs). So the strategies are comparable: DDP, ZeRO-2 and
ZeRO-3 must log the same losses and TRL statistics (rewards/*, logps/*) and end with the same
weights, and those of one process trained in-process at the same global batch (4 pairs), which
sees every pair of a step itself: rank 1's pairs missing from the gathered statistics, or a
reference that differs from the starting model, would show.

The references covered: the frozen copy (under ZeRO-3 loaded partitioned and run by its own
DeepSpeed inference engine), the disabled adapter (LoRA under ZeRO-3), and precomputed before
training (each rank a shard of the records, all-gathered): the disabled adapter under DDP, and
the partitioned copy when resuming a ZeRO-3 run. Each 2-rank run takes ~35-55 s on 2 cores
(≈7 s of imports per process, the starting model loaded twice for a copy), so they are marked
slow (`pytest -m slow`); six in all, plus two one-process runs in this process (~10 s each).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava_cli.config.resolve import resolve_config
from llava_cli.demo.shapes import generate_split
from llava_cli.train.run import run_training
from tests.helpers import PLAIN_SCHEDULE, Run, assert_output_is_the_trained_model, consolidated
from tests.helpers import assert_no_placeholders as _assert_no_placeholders
from tests.helpers import assert_quiet_other_rank as _assert_quiet_other_rank
from tests.helpers import eval_logits as _logits
from tests.helpers import plain_model as _plain
from tests.helpers import probe_batch as _probe
from tests.helpers import torchrun_launcher as _launcher

ROOT = Path(__file__).resolve().parents[2]
ZERO2, ZERO3 = (str(ROOT / "recipes" / "deepspeed" / f"zero{n}.json") for n in (2, 3))
STEPS = 4  # checkpoints at 2 and 4 (save_steps 2): resume from 2, consolidate 4
PAIRS = 8  # 8 pairs at a global batch of 4 (2 ranks × 2): 2 steps per epoch
LR = "1e-2"  # large for DPO, so that 4 steps move the rewards well away from 0
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
         "rewards/accuracies", "logps/chosen", "logps/rejected")
LORA = ("--lora", "--lora-r", "8", "--lora-alpha", "16")


@pytest.fixture(scope="module")
def base(finetuned_base_dir, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny finetuned LLaVA (`finetuned_base_dir`), and preference pairs."""
    root = tmp_path_factory.mktemp("dpo-dist")
    pairs = generate_split(root / "pairs", PAIRS, 3, "dpo")
    held_out = pairs.with_name("held-out.json")  # one pair: fewer than the ranks
    held_out.write_text(json.dumps(json.loads(pairs.read_text())[:1]))
    return {"base": finetuned_base_dir, "records": pairs, "images": pairs.parent,
            "held_out": held_out, "root": root}


def launch(base: dict[str, Path], out: Path, *extra: str, overwrite: bool = True) -> Run:
    """`llava dpo` on two ranks from the shared base; fails with the ranks' logs on error."""
    logs = out.parent / f"{out.name}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    command = [*_launcher(), "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs),
               "--redirects", "3", "-m", "llava_cli", "dpo",
               "--model-name-or-path", str(base["base"]), "--data-path", str(base["records"]),
               "--image-folder", str(base["images"]), "--batch-size", "2",
               "--max-steps", str(STEPS), "--save-steps", "2", "--lr", LR, "--seed", "7",
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
    print(f"{out.name}: {run.seconds:.1f} s")  # shown with -s / -rP
    return run


def one_process(base: dict[str, Path], out: Path, **flags) -> Path:
    """The same job in this process, one rank with the global batch (4 pairs a step)."""
    config = resolve_config("dpo", flags={
        "model_name_or_path": str(base["base"]), "data_path": str(base["records"]),
        "image_folder": str(base["images"]), "per_device_train_batch_size": 4,
        "max_steps": STEPS, "save_steps": 100, "learning_rate": float(LR), "seed": 7,
        "output_dir": str(out), **PLAIN_SCHEDULE, **flags})
    run_training(config)
    return out


def _assert_output_is_the_trained_model(run: Run) -> None:
    assert_output_is_the_trained_model(run, STEPS)


def _stats(state: dict) -> dict[str, list[float]]:
    """Each logged step's loss and preference statistics, by name."""
    rows = [row for row in state["log_history"] if "loss" in row]
    return {name: [row[name] for row in rows] for name in STATS}


def _assert_same_training(a: dict, b: dict, weights_a: Path, weights_b: Path) -> None:
    """The same logged statistics (rewards are logged to 6 decimals) and final weights."""
    for name, values in _stats(a).items():
        assert torch.allclose(torch.tensor(values), torch.tensor(_stats(b)[name]), rtol=1e-4,
                              atol=2e-6), name
    x, y = load_file(str(weights_a)), load_file(str(weights_b))
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst < 1e-4, worst


def _state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def single(base, tmp_path_factory) -> Path:
    return one_process(base, tmp_path_factory.mktemp("dpo-single") / "out")


@pytest.fixture(scope="module")
def ddp(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("dpo-ddp") / "out")


@pytest.fixture(scope="module")
def zero3(base, tmp_path_factory) -> Run:
    return launch(base, tmp_path_factory.mktemp("dpo-zero3") / "out", "--deepspeed", ZERO3)


@pytest.mark.slow
def test_dpo_ddp_trains_as_one_process_with_the_global_batch(ddp, single, base):
    state = ddp.state
    assert state["global_step"] == STEPS and state["log_history"][0]["epoch"] == 0.5
    stats = _stats(state)
    # Step 1: the reference (a frozen copy) is the starting model, so every ratio is 0.
    assert stats["loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/chosen"][0] == stats["rewards/rejected"][0] == 0
    # After it the policy moved away from the reference.
    assert all(abs(value) > 1e-3 for value in stats["rewards/rejected"][1:])
    _assert_quiet_other_rank(ddp)
    # Rank 1's pairs count in every statistic: one process seeing all 4 pairs logs the same.
    _assert_same_training(state, _state(single), ddp.output_dir / "model.safetensors",
                          single / "model.safetensors")
    _assert_no_placeholders(ddp.output_dir / "model.safetensors",
                            base["base"] / "model.safetensors")
    assert json.loads((ddp.output_dir / "llava_run.json").read_text())["kind"] == "full"
    reloaded = _plain(ddp.output_dir)
    saved = load_file(str(ddp.output_dir / "model.safetensors"))
    assert torch.equal(reloaded.lm_head.weight, saved["language_model.lm_head.weight"])


@pytest.mark.slow
def test_dpo_zero2_equals_ddp_and_saves_the_trained_model(ddp, base, tmp_path):
    zero2 = launch(base, tmp_path / "zero2", "--deepspeed", ZERO2)
    assert zero2.state["global_step"] == STEPS
    _assert_quiet_other_rank(zero2)
    _assert_same_training(zero2.state, ddp.state, zero2.output_dir / "model.safetensors",
                          ddp.output_dir / "model.safetensors")
    _assert_output_is_the_trained_model(zero2)


@pytest.mark.slow
def test_dpo_zero3_partitioned_copy_reference_equals_ddp(zero3, ddp, base):
    """The frozen copy loads partitioned too (its own inference engine gathers it)."""
    assert zero3.state["global_step"] == STEPS
    assert _stats(zero3.state)["loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    _assert_quiet_other_rank(zero3)
    for folder in (zero3.output_dir, zero3.output_dir / f"checkpoint-{STEPS}"):
        _assert_no_placeholders(folder / "model.safetensors", base["base"] / "model.safetensors")
    _assert_same_training(zero3.state, ddp.state, zero3.output_dir / "model.safetensors",
                          ddp.output_dir / "model.safetensors")
    _assert_output_is_the_trained_model(zero3)


def _assert_reference_is_the_start(state: dict, beta: float = 0.1) -> None:
    """Whatever the policy's initialisation, the reference is the starting model: each step's
    mean reference log-prob is logps − rewards / beta, and epoch 2 (steps 3-4) sees the same 8
    pairs as epoch 1 (steps 1-2), so their means over an epoch agree (rewards logged to 6
    decimals: beta 0.1 gives 1e-5)."""
    rows = [row for row in state["log_history"] if "loss" in row]
    for reply in ("chosen", "rejected"):
        ref = [row[f"logps/{reply}"] - row[f"rewards/{reply}"] / beta for row in rows]
        assert (ref[0] + ref[1]) / 2 == pytest.approx((ref[2] + ref[3]) / 2, abs=2e-5), reply
        assert ref[0] == rows[0][f"logps/{reply}"]  # step 1: the policy is the start


@pytest.mark.slow
def test_dpo_zero3_lora_disabled_adapter_reference(base, tmp_path):
    """The reference is the policy with its adapters off, run through the ZeRO-3 engine.
    (zero.Init's partitioned load draws other random numbers before LoRA's initialisation,
    so this run's adapters start elsewhere than one process's: compared with the start.)"""
    from peft import PeftModel

    run = launch(base, tmp_path / "lora", *LORA, "--lora-dropout", "0", "--deepspeed", ZERO3)
    assert run.state["global_step"] == STEPS
    _assert_quiet_other_rank(run)
    stats = _stats(run.state)
    assert stats["loss"][0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at 0
    assert all(abs(value) > 1e-4 for value in stats["rewards/margins"][1:])
    _assert_reference_is_the_start(run.state)
    assert json.loads((run.output_dir / "llava_run.json").read_text())["kind"] == "lora"
    assert not (run.output_dir / "model.safetensors").exists()
    # The adapter holds full shapes and the trained values: DeepSpeed's masters, renamed.
    adapter = load_file(str(run.output_dir / "adapter_model.safetensors"))
    masters = consolidated(run.output_dir / f"checkpoint-{STEPS}")
    assert adapter and len(adapter) == len(masters)
    for key, tensor in adapter.items():
        live = (key.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight"))
        assert tensor.numel() > 0 and torch.equal(tensor, masters[live]), key
    # Stock transformers + PEFT load base + adapter, and it is not the base any more.
    reloaded = PeftModel.from_pretrained(_plain(base["base"]), run.output_dir)
    batch = _probe(transformers.AutoProcessor.from_pretrained(run.output_dir))
    assert not torch.equal(_logits(reloaded, batch), _logits(_plain(base["base"]), batch))


@pytest.mark.slow
def test_dpo_ddp_lora_precomputed_reference_as_one_process_live(base, tmp_path):
    """DDP with LoRA, the disabled-adapter reference precomputed (each rank a shard of the
    records, all-gathered): as one process computing the reference live at every step."""
    run = launch(base, tmp_path / "lora-precomputed", *LORA, "--lora-dropout", "0",
                 "--precompute-ref-log-probs")
    alone = one_process(base, tmp_path / "lora-one", train_llm="lora", lora_r=8, lora_alpha=16,
                        lora_dropout=0.0)
    assert run.state["global_step"] == STEPS
    assert all(abs(value) > 1e-4 for value in _stats(run.state)["rewards/margins"][1:])
    _assert_reference_is_the_start(run.state)
    _assert_same_training(run.state, _state(alone), run.output_dir / "adapter_model.safetensors",
                          alone / "adapter_model.safetensors")


@pytest.mark.slow
def test_dpo_zero3_resume_with_a_precomputed_partitioned_copy(zero3, tmp_path, base):
    """ZeRO-3 from its step-2 checkpoint, the reference precomputed by the partitioned copy's
    engine: steps 3-4 as the uninterrupted live-reference run. A held-out set of one pair
    (fewer records than ranks: rank 1's shard of the precomputed pass is empty, yet it must
    run the copy's forwards, which gather weights collectively) is evaluated at step 4."""
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(zero3.output_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = launch(base, resumed_dir, "--deepspeed", ZERO3, "--precompute-ref-log-probs",
                     "--eval-data-path", str(base["held_out"]), "--resume", "latest",
                     overwrite=False)
    assert resumed.state["global_step"] == STEPS
    logged = [row["step"] for row in resumed.state["log_history"] if "loss" in row]
    assert logged == list(range(1, STEPS + 1))  # 1-2 from the checkpoint, 3-4 trained
    _assert_same_training(resumed.state, zero3.state, resumed.output_dir / "model.safetensors",
                          zero3.output_dir / "model.safetensors")
    evaluated = [row for row in resumed.state["log_history"] if "eval_loss" in row]
    assert [row["step"] for row in evaluated] == [STEPS]
    # One pair (rank 1 evaluates it again): its DPO loss from its logged reward margin.
    margin = evaluated[0]["eval_rewards/margins"]
    assert evaluated[0]["eval_loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-margin))),
                                                     abs=1e-5)
    assert margin != 0 and evaluated[0]["eval_rewards/accuracies"] in (0, 1)
