"""DeepSpeed ZeRO-2/3 on two processes, starting the way users start: from models saved to disk
and loaded with `from_pretrained` (never `random_init`) — an LLM + vision tower + projector
file (the LLaVA-1.5 recipe's path), a `llava pretrain` output and an existing LLaVA
checkpoint; full, LoRA and QLoRA (ZeRO-2: DeepSpeed cannot partition 4-bit weights); fp32
and bf16.

Before the first step every component's gathered weights must equal the files they came from
(`zero_probe.py` writes them); then the run trains, saves, reloads without DeepSpeed, resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from safetensors.torch import load_file  # noqa: E402

from llava_cli.artifacts.projector_file import (  # noqa: E402
    PROJECTOR_PREFIX,
    read_projector_file,
    write_projector_file,
)
from llava_cli.config.resolve import resolve_config  # noqa: E402
from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer  # noqa: E402
from llava_cli.inspect.inspection import demo_data  # noqa: E402
from llava_cli.train.run import run_training  # noqa: E402
from tests.helpers import PLAIN_SCHEDULE, ROOT  # noqa: E402

pytestmark = pytest.mark.slow
RECORDS, IMAGES = demo_data()
ZERO2, ZERO3 = (str(ROOT / "recipes" / "deepspeed" / f"zero{n}.json") for n in (2, 3))
PROBE_SCRIPT = Path(__file__).with_name("zero_probe.py")
STEPS = 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """An LLM (with its tokenizer), a CLIP tower and a projector file, saved with real (seeded
    random) weights, and a `llava pretrain` output made from them."""
    root = tmp_path_factory.mktemp("real")
    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4)).save_pretrained(root / "vit")
    generator = torch.Generator().manual_seed(1)
    shapes = {"linear_1.weight": (64, 32), "linear_1.bias": (64,), "linear_2.weight": (64, 64),
              "linear_2.bias": (64,)}
    write_projector_file({PROJECTOR_PREFIX + k: torch.randn(*s, generator=generator)
                          for k, s in shapes.items()}, root / "projector.safetensors")
    run_training(resolve_config("pretrain", flags={
        "model_name_or_path": str(root / "llm"), "vision_tower": str(root / "vit"),
        "data_path": RECORDS, "image_folder": IMAGES, "max_steps": 1,
        "per_device_train_batch_size": 2, "output_dir": str(root / "pretrain"),
        "skip_bad_records": True, **PLAIN_SCHEDULE}))  # the sample has a text-only record
    run_training(resolve_config("finetune", flags={  # an existing LLaVA checkpoint
        "model_name_or_path": str(root / "pretrain"), "data_path": RECORDS,
        "image_folder": IMAGES, "max_steps": 1, "per_device_train_batch_size": 2,
        "output_dir": str(root / "checkpoint"), **PLAIN_SCHEDULE}))
    return {"llm": root / "llm", "vit": root / "vit", "projector": root / "projector.safetensors",
            "pretrain": root / "pretrain", "checkpoint": root / "checkpoint"}


def launch(stage: str, out: Path, **flags) -> Path:
    """Two ranks on gloo through the command's library call; returns the output directory."""
    flags = {"data_path": RECORDS, "image_folder": IMAGES, "per_device_train_batch_size": 2,
             "max_steps": STEPS, "save_steps": 2, "learning_rate": 1e-2, "seed": 7,
             "output_dir": str(out), "dataloader_num_workers": 0, **PLAIN_SCHEDULE, **flags}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(PROBE_SCRIPT), stage,
               str(out.parent / f"{out.name}.probe.safetensors"), json.dumps(flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{stage} {flags} failed:\n{done.stderr[-4000:]}"
    return out


def _normalised(probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Probe keys as the plain model names them: LoRA's base layers and PEFT's trained copy of
    the projector unwrapped, LoRA weights left out (they are new)."""
    out = {}
    for key, tensor in probe.items():
        if "lora_" in key or "original_module." in key:
            continue
        out[key.replace(".base_layer.", ".").replace("modules_to_save.default.", "")] = tensor
    return out


def assert_started_from_the_files(out: Path, parts: dict[str, Path], projector: Path,
                                  dtype: torch.dtype = torch.float32) -> None:
    """Every component's weights before the first step == the file it was loaded from."""
    probe = _normalised(load_file(str(out.parent / f"{out.name}.probe.safetensors")))
    expected = {}
    for key, tensor in load_file(str(parts["llm"] / "model.safetensors")).items():
        name = "lm_head.weight" if key == "lm_head.weight" else "llm." + key.removeprefix("model.")
        expected[name] = tensor
    for key, tensor in load_file(str(parts["vit"] / "model.safetensors")).items():
        expected["vision_tower." + key.removeprefix("vision_model.")] = tensor
    for key, tensor in read_projector_file(projector).items():
        expected["projector." + key] = tensor
    assert set(expected) <= set(probe), sorted(set(expected) - set(probe))[:5]
    for key, tensor in expected.items():
        assert probe[key].dtype == dtype, key
        assert torch.equal(probe[key], tensor.to(dtype)), key


def _checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved LLaVA checkpoint's tensors under the probe's component names."""
    names = {"language_model.model.": "llm.", "language_model.lm_head.": "lm_head.",
             "vision_tower.vision_model.": "vision_tower.", "vision_tower.": "vision_tower.",
             "multi_modal_projector.": "projector."}
    out = {}
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        prefix = next(p for p in names if key.startswith(p))
        out[names[prefix] + key.removeprefix(prefix)] = tensor
    return out


def assert_started_from_the_checkpoint(out: Path, checkpoint: Path,
                                       quantized: bool = False) -> None:
    """Every component before the first step == the checkpoint's file (QLoRA: the 4-bit LLM
    linears are quantized, everything else equal)."""
    probe = _normalised(load_file(str(out.parent / f"{out.name}.probe.safetensors")))
    expected = _checkpoint_weights(checkpoint)
    compared = 0
    for key, tensor in expected.items():
        if quantized and probe[key].dtype == torch.uint8:
            continue  # bitsandbytes storage of a quantized linear
        assert torch.equal(probe[key].float(), tensor.float()), key
        compared += 1
    assert compared > len(expected) // 3


def _plain(output_dir: Path):
    """The output as any user loads it: stock transformers, one process, no DeepSpeed."""
    return transformers.LlavaForConditionalGeneration.from_pretrained(output_dir)


def _assert_resumes_to_the_same_weights(stage: str, run: Path, tmp_path: Path, **flags) -> None:
    resumed_dir = tmp_path / f"{run.name}-resumed"
    shutil.copytree(run / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = launch(stage, resumed_dir, resume="latest", **flags)
    state = json.loads((resumed / "trainer_state.json").read_text())
    assert [row["step"] for row in state["log_history"] if "loss" in row] == [1, 2, 3, 4]
    a, b = (load_file(str(d / "model.safetensors")) for d in (run, resumed))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6


@pytest.mark.parametrize("deepspeed", [ZERO3, ZERO2], ids=["zero3", "zero2"])
def test_full_finetune_from_llm_tower_and_projector_file(parts, tmp_path, deepspeed):
    """The LLaVA-1.5 recipe's path: LLM + --vision-tower + --pretrained-projector."""
    flags = {"model_name_or_path": str(parts["llm"]), "vision_tower": str(parts["vit"]),
             "pretrained_projector": str(parts["projector"]), "deepspeed": deepspeed}
    run = launch("finetune", tmp_path / "full", **flags)
    assert_started_from_the_files(run, parts, parts["projector"])
    reloaded = _plain(run).state_dict()
    vision = load_file(str(parts["vit"] / "model.safetensors"))
    for key, tensor in vision.items():  # frozen: the saved tower is still the file's
        assert torch.equal(reloaded["model.vision_tower." + key.removeprefix("vision_model.")],
                           tensor), key
    llm = load_file(str(parts["llm"] / "model.safetensors"))
    moved = (reloaded["model.language_model.norm.weight"] - llm["model.norm.weight"]).abs().max()
    assert 0 < moved < 0.1  # trained a little from the file's weights, not from random ones
    _assert_resumes_to_the_same_weights("finetune", run, tmp_path, **flags)


@pytest.mark.parametrize("deepspeed", [ZERO3, ZERO2], ids=["zero3", "zero2"])
def test_bf16_lora_from_a_pretrain_output_then_merge(parts, tmp_path, deepspeed):
    from llava_cli.merge.merge import merge_lora

    run = launch("lora", tmp_path / "lora", model_name_or_path=str(parts["pretrain"]),
                 deepspeed=deepspeed, bf16=True, lora_r=4, lora_alpha=8)
    assert_started_from_the_files(run, parts, parts["pretrain"] / "projector.safetensors",
                                  dtype=torch.bfloat16)
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter) and all(v.numel() for v in adapter.values())
    merged = merge_lora(run, tmp_path / "merged", dtype="bfloat16")
    assert merged.checks and all(check.ok for check in merged.checks)
    assert _plain(tmp_path / "merged").dtype == torch.bfloat16


def test_bf16_full_finetune_from_a_pretrain_output(parts, tmp_path):
    run = launch("finetune", tmp_path / "bf16", model_name_or_path=str(parts["pretrain"]),
                 deepspeed=ZERO3, bf16=True)
    assert_started_from_the_files(run, parts, parts["pretrain"] / "projector.safetensors",
                                  dtype=torch.bfloat16)
    saved = load_file(str(run / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() and v.numel() for v in saved.values())


def test_zero3_full_finetune_from_a_llava_checkpoint(parts, tmp_path):
    run = launch("finetune", tmp_path / "ckpt", model_name_or_path=str(parts["checkpoint"]),
                 deepspeed=ZERO3)
    assert_started_from_the_checkpoint(run, parts["checkpoint"])
    assert _plain(run).state_dict().keys() == _plain(parts["checkpoint"]).state_dict().keys()


def test_qlora_under_zero2_from_a_llava_checkpoint_then_merge(parts, tmp_path):
    """QLoRA where DeepSpeed allows it (ZeRO-2; ZeRO-3 is refused: bitsandbytes weights cannot
    be partitioned)."""
    from llava_cli.merge.merge import merge_lora

    run = launch("finetune", tmp_path / "qlora", model_name_or_path=str(parts["checkpoint"]),
                 deepspeed=ZERO2, train_llm="lora", bits=4, lora_r=4, lora_alpha=8)
    assert_started_from_the_checkpoint(run, parts["checkpoint"], quantized=True)
    merged = merge_lora(run, tmp_path / "merged")
    assert merged.bits == 4 and all(check.ok for check in merged.checks)
