"""The original training scripts' argument lists, run through our CLI as written.

`tests/original_scripts/` holds the scripts verbatim: LLaVA's `scripts/v1_5/*.sh` and
`scripts/finetune_qlora.sh` (haotian-liu/LLaVA c121f04) and InternVL's LLaVA-1.5 pair
(`internvl_chat_llava/scripts_internvl/{pre,fine}train_internvit6b_448_v1_5_vicuna13b.sh`,
OpenGVLab/InternVL 2410d1d). Their arguments are taken the way bash passes them to
`train_mem.py` (continuations joined, quotes removed) and given to `llava pretrain|finetune|
lora` unchanged, in a folder laid out as the scripts expect, where each hub name and path they
use holds a tiny model. What changes on this CPU machine, and nothing else (each marked where
it happens): `--max_steps 2` appended; `--tf32 True` → `False` (tf32 needs an Ampere GPU);
`--report_to wandb` → `none` (no network, wandb not installed); InternVL's `${OUTPUT_DIR}` →
the value its script assigns (what the shell would substitute).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_cli.cli import main
from tests.helpers import ROOT

SCRIPTS = Path(__file__).parent / "original_scripts"
LLAVA_V1_5 = ("llava_v1_5_pretrain", "llava_v1_5_finetune", "llava_v1_5_finetune_lora",
              "llava_v1_5_finetune_task", "llava_v1_5_finetune_task_lora")
INTERNVL = ("internvl_pretrain", "internvl_finetune")
STAGES = {"llava_v1_5_pretrain": "pretrain", "llava_v1_5_finetune": "finetune",
          "llava_v1_5_finetune_lora": "lora", "llava_v1_5_finetune_task": "finetune",
          "llava_v1_5_finetune_task_lora": "lora", "internvl_pretrain": "pretrain",
          "internvl_finetune": "finetune"}
HUB_LLMS = ("lmsys/vicuna-13b-v1.5", "pretrained/vicuna-13b-v1.5")
HUB_TOWERS = ("openai/clip-vit-large-patch14-336", "pretrained/InternViT-6B-448px-V1-5")


def script_text(name: str) -> str:
    return (SCRIPTS / f"{name}.sh").read_text()


def original_arguments(name: str) -> list[str]:
    """The words bash passes to train_mem.py: continuations joined, quotes removed, up to a
    pipe; `${OUTPUT_DIR}` replaced by the value the script assigns to it."""
    text = script_text(name)
    assigned = {}
    for line in text.splitlines():
        if line.startswith("OUTPUT_DIR="):
            assigned["${OUTPUT_DIR}"] = shlex.split(line.partition("=")[2])[0]
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    words = words[words.index("llava/train/train_mem.py") + 1:]
    words = words[: words.index("|")] if "|" in words else words
    return [assigned.get(word, word) for word in words]


def on_this_cpu(words: list[str]) -> list[str]:
    """The only changes the CPU machine needs (see the module docstring)."""
    changed = list(words)
    for name, value in (("--tf32", "False"), ("--report_to", "none")):
        if name in changed:
            changed[changed.index(name) + 1] = value  # tf32: Ampere only; wandb: not here
    return [*changed, "--max_steps", "2"]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`llava_cli.cli.main` with `argv`: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as done:
        main(["llava", *argv])
    captured = capsys.readouterr()
    return done.value.code or 0, captured.out, captured.err


@pytest.mark.parametrize("name", [*LLAVA_V1_5, *INTERNVL])
def test_every_script_resolves_as_written(name, capsys, tmp_path, monkeypatch):
    """--print-config of each script's arguments, exactly as written (no CPU changes needed to
    resolve): the keys land where LLaVA meant them, and the no-ops are noted."""
    monkeypatch.chdir(tmp_path)
    _deepspeed_configs(tmp_path / "scripts")
    words = original_arguments(name)
    code, out, err = run_main([STAGES[name], *words, "--report_to", "none", "--print-config"],
                              capsys)
    assert code == 0, err
    given = dict(zip(words[::2], words[1::2], strict=True))
    assert f"per_device_train_batch_size: {given['--per_device_train_batch_size']}" in out
    assert "eval_strategy: 'no'" in out and "tf32: true" in out
    assert f"vision_select_layer: {given['--mm_vision_select_layer']}" in out
    template = "plain" if given["--version"] == "plain" else "v1"
    assert f"template: {template}" in out
    assert "# note: lazy_preprocess: accepted, no effect" in out
    assert "# note: mm_use_im_patch_token: accepted, no effect" in out
    llm = "frozen" if STAGES[name] == "pretrain" else "lora" if "lora" in name else "full"
    assert f"train_llm: {llm}" in out


def _deepspeed_configs(folder: Path) -> None:
    """`./scripts/zero{1,2,3}.json`, which the scripts name: ours (recipes/deepspeed), and a
    ZeRO-1 one written from our ZeRO-2 one with stage 1 (InternVL's pretrain uses ZeRO-1)."""
    shutil.copytree(ROOT / "recipes" / "deepspeed", folder)
    zero1 = json.loads((folder / "zero2.json").read_text())
    zero1["zero_optimization"] = {"stage": 1}
    (folder / "zero1.json").write_text(json.dumps(zero1))


def _tiny_world(root: Path) -> Path:
    """A folder laid out as the scripts expect, with tiny models under their names."""
    import torch
    import transformers

    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
    from llava_cli.demo.shapes import generate_split

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    for name in HUB_LLMS:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=2048)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for name in HUB_TOWERS:
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4)).save_pretrained(root / name)
    _deepspeed_configs(root / "scripts")
    data = root / "playground" / "data"
    pretrain = json.loads(generate_split(data / "LLaVA-Pretrain", 8, 0, "pretrain").read_text())
    for record in pretrain:
        record["image"] = record["image"].removeprefix("images/")
    (data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    mix = json.loads(generate_split(data / "mix", 12, 0, "finetune").read_text())
    for record in mix:
        if record.get("image"):
            record["image"] = "mix/" + record["image"]
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    (root / "playground" / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))  # InternVL's
    return root


def _llava(world: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m llava_cli ARGV` in the world: the console entry point, `main`, as launched."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "llava_cli", *argv], cwd=world, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def _export_mm_projector(world: Path, pretrain_output: str) -> None:
    """The stage-2 scripts load `PRETRAIN_OUTPUT/mm_projector.bin`, which the original's
    pretrain writes; ours writes projector.safetensors, and export-projector writes LLaVA's
    file from it."""
    _llava(world, ["export-projector", pretrain_output, "-o",
                   f"{pretrain_output}/mm_projector.bin"])


@pytest.mark.slow
def test_llava_v1_5_scripts_train_as_written(tmp_path):
    world = _tiny_world(tmp_path / "world")
    done = _llava(world, ["pretrain", *on_this_cpu(original_arguments("llava_v1_5_pretrain"))])
    assert "note: lazy_preprocess: accepted, no effect" in done.stderr
    assert (world / "checkpoints/llava-v1.5-13b-pretrain/projector.safetensors").is_file()
    _export_mm_projector(world, "./checkpoints/llava-v1.5-13b-pretrain")
    _llava(world, ["finetune", *on_this_cpu(original_arguments("llava_v1_5_finetune"))])
    assert (world / "checkpoints/llava-v1.5-13b/model.safetensors").is_file()
    _llava(world, ["lora", *on_this_cpu(original_arguments("llava_v1_5_finetune_lora"))])
    assert (world / "checkpoints/llava-v1.5-13b-lora/adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_internvl_llava_scripts_train_as_written(tmp_path):
    world = _tiny_world(tmp_path / "world")
    _llava(world, ["pretrain", *on_this_cpu(original_arguments("internvl_pretrain"))])
    pretrain = "./work_dirs/pretrain_internvit6b_448_v1_5_vicuna13b"
    _export_mm_projector(world, pretrain)
    _llava(world, ["finetune", *on_this_cpu(original_arguments("internvl_finetune"))])
    assert (world / "work_dirs/finetune_internvit6b_448_v1_5_vicuna13b/model.safetensors"
            ).is_file()
