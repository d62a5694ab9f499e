"""The README's commands and every shipped LLaVA-1.5 recipe, run as written.

They run in a folder laid out the way the recipes expect (`./playground/data/…`,
`./checkpoints/…`), where the hub names they use (`lmsys/vicuna-7b-v1.5`,
`openai/clip-vit-large-patch14-336`, `llava-hf/llava-1.5-7b-hf`) are local folders holding tiny
models — transformers loads a local folder of that name before asking the hub. What changes on
this CPU machine, and nothing else: `--max-steps 2`, `--set tf32=false` (tf32 needs an Ampere
GPU), and 2 processes where the README launches 8.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
CPU_TRAINING = ["--max-steps", "2", "--set", "tf32=false"]
PLACEHOLDERS = {"PATH": "lmsys/vicuna-7b-v1.5", "IMAGES": "imgs", "LLAVA_DIR": "runs/mine-merged"}
# Launchers the README shows as alternatives to the torchrun line it also shows (the same run).
ALTERNATIVES = ("deepspeed --num_gpus", "accelerate launch", "--nnodes 2")


def readme_commands() -> list[str]:
    """The README's bash lines that run llava (set-up lines and alternative launchers aside),
    in order, continuation lines joined, comments dropped, each once."""
    text = (ROOT / "README.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith(("llava ", "torchrun ")) or "llava demo" in line:
                continue
            if not any(alt in line for alt in ALTERNATIVES) and line not in commands:
                commands.append(line)
    return commands


def _tiny_models(world: Path) -> None:
    import torch
    import transformers

    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    for name in ("lmsys/vicuna-7b-v1.5", "lmsys/vicuna-13b-v1.5"):
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=2048)).save_pretrained(world / name)
        tokenizer.save_pretrained(world / name)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4)).save_pretrained(world / "openai/clip-vit-large-patch14-336")


def _records(folder: Path, n: int, kind: str, prefix: str) -> list[dict]:
    """Shape pictures in `folder`, their records' image paths starting with `prefix`."""
    from llava_cli.demo.shapes import generate_split

    records = json.loads(generate_split(folder, n, 0, kind).read_text())  # type: ignore[arg-type]
    for record in records:
        if record.get("image"):
            record["image"] = prefix + record["image"].removeprefix("images/")
    return records


def _world(root: Path, photo: Path) -> Path:
    world = root / "world"
    shutil.copytree(ROOT / "recipes", world / "recipes")
    _tiny_models(world)
    data = world / "playground" / "data"
    pretrain = _records(data / "LLaVA-Pretrain", 8, "pretrain", "")
    (data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    mix = _records(data / "mix", 12, "finetune", "mix/images/")
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    mine = _records(world / "imgs", 6, "finetune", "images/")
    mine[0]["id"] = "000000033471"  # the id the README's inspect-data line asks for
    (world / "mine.json").write_text(json.dumps(mine))
    (world / "data.json").write_text(json.dumps(mine))
    pairs = _records(world / "imgs", 4, "dpo", "")  # preference pairs for `llava dpo`
    (world / "pairs.json").write_text(json.dumps(pairs))
    shutil.copytree(world / "imgs" / "images", world / "images")  # without --image-folder
    shutil.copy(photo, world / "cat.jpg")
    (world / "runs").mkdir()
    # What the README's commands start from: the outputs of the recipe chain before them.
    for link, target in (("runs/ft", "checkpoints/llava-v1.5-7b"),
                         ("runs/pretrain", "checkpoints/llava-v1.5-7b-pretrain"),
                         ("llava-hf/llava-1.5-7b-hf", "checkpoints/llava-v1.5-7b")):
        (world / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(world / target, world / link)
    return world


def _as_run_here(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "torchrun":
        words[words.index("--nproc_per_node") + 1] = "2"
        words = [str(Path(sys.executable).with_name("torchrun")), "--standalone", *words[1:]]
    else:
        words[0] = str(Path(sys.executable).with_name("llava"))
    words = [PLACEHOLDERS.get(word, word) for word in words]
    redirect = None
    if ">" in words:
        redirect = words[words.index(">") + 1]
        words = words[: words.index(">")]
    stage = next((w for w in words if w in ("pretrain", "finetune", "lora", "dpo")), None)
    if stage:
        words += CPU_TRAINING
    line = shlex.join(words)
    return f"{line} > {shlex.quote(redirect)}" if redirect else line


def _run(world: Path, command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-c", _as_run_here(command)], cwd=world, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_readme_commands_and_the_recipes_run_as_written(tmp_path, assets):
    world = _world(tmp_path, assets / "images" / "extreme_ironing.jpg")
    commands = readme_commands()
    assert commands[0] == "llava pretrain recipes/llava-v1.5-7b/pretrain.yaml"
    assert len(commands) >= 10, commands
    for command in commands:
        _run(world, command)
    assert (world / "checkpoints/llava-v1.5-7b-pretrain/projector.safetensors").is_file()
    assert (world / "checkpoints/llava-v1.5-7b/model.safetensors").is_file()
    assert (world / "runs/mine-merged/model.safetensors").is_file()
    assert (world / "runs/q/adapter_model.safetensors").is_file()
    assert (world / "mm_projector.bin").is_file()
    masks = [json.loads(line) for line in (world / "masks.jsonl").read_text().splitlines()]
    records = json.loads((world / "data.json").read_text())
    assert [m["id"] for m in masks] == [r["id"] for r in records]
    assert {"id", "input_ids", "labels"} <= set(masks[0])
    # The recipes the README does not run itself: the 7B LoRA and the 13B chain.
    for recipe in ("llava-v1.5-7b/lora.yaml", "llava-v1.5-13b/pretrain.yaml",
                   "llava-v1.5-13b/finetune.yaml", "llava-v1.5-13b/lora.yaml"):
        stage = Path(recipe).stem
        _run(world, f"llava {stage} recipes/{recipe}")
    assert (world / "checkpoints/llava-v1.5-13b-lora/adapter_model.safetensors").is_file()
