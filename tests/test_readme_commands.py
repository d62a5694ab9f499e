"""The command blocks of README.md and docs/*.md, run as written; the LLaVA-1.5 recipes too.

Every fenced ```bash or ```python block of the README and the guides either runs here, its text
unchanged, or is preceded by an HTML comment `<!-- not run here: REASON -->` (a GPU, the hub, a
run that another test already makes). The blocks that run form one walkthrough: they run in
document order (README first, then the guides in `ORDER`) in one temporary project that links
`llava_cli/`, `recipes/` and `tests/` from this checkout, so that `runs/my/…` made by the README
is what the guides continue from.

- Default suite: the cheap blocks (`--help`, `--print-config`, `inspect-data`,
  `recipe-from-script`, and shell set-up such as `cp`), which load no model.
- Slow suite: every runnable block, training included, in one test.

`test_the_llava_1_5_recipes_run_with_tiny_stand_ins` (slow) runs the LLaVA-1.5 recipes that the
guides show but cannot run here, in a folder laid out the way the recipes expect
(`./playground/data/…`, `./checkpoints/…`), where the hub names they use are local folders
holding tiny models: transformers loads a local folder of that name before asking the hub. What
changes on this CPU machine, and nothing else: `--max-steps 2`, `--set tf32=false` (tf32 needs
an Ampere GPU), and 2 processes where the recipe says 8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

# The guides in walkthrough order: each may use what the ones before it made.
ORDER = ("data", "recipes", "lora", "outputs", "evaluation", "dpo", "guarantees", "distributed",
         "speed", "from-original-llava", "demo")
NOT_RUN = re.compile(r"<!--\s*not run here:(.*?)-->", re.S)
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
CHEAP_COMMANDS = ("llava inspect-data", "llava recipe-from-script")
CHEAP_FLAGS = ("--help", "--print-config")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository root
    line: int
    language: str
    text: str
    not_run: str | None  # the reason, when the block says it is not run here

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def commands(self) -> list[str]:
        """The block's lines that start a command (continuations joined, heredoc bodies kept)."""
        return [line.strip() for line in self.text.replace("\\\n", " ").splitlines()
                if line.strip() and not line.startswith((" ", "[", "{"))]

    @property
    def cheap(self) -> bool:
        """Loads no model and trains nothing: runs in the default suite."""
        if self.language != "bash" or "runs/" in self.text or "torchrun" in self.text:
            return False
        return all(not c.startswith("llava ") or c.startswith(CHEAP_COMMANDS)
                   or any(flag in c.split() for flag in CHEAP_FLAGS) for c in self.commands())

    @property
    def sets_up(self) -> bool:
        """Has a command other than llava (cp, cat > file): later blocks may need what it made."""
        return any(not c.startswith("llava ") for c in self.commands())


def documents() -> list[Path]:
    docs = ROOT / "docs"
    ordered = [docs / f"{name}.md" for name in ORDER if (docs / f"{name}.md").is_file()]
    rest = sorted(p for p in docs.glob("*.md") if p not in ordered)
    return [ROOT / "README.md", *ordered, *rest]


def blocks() -> list[Block]:
    found = []
    for path in documents():
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip().splitlines()
            marker = NOT_RUN.fullmatch(before[-1].strip()) if before else None
            found.append(Block(str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1,
                               match.group(1), match.group(2),
                               marker.group(1).strip() if marker else None))
    return found


def runnable(cheap_only: bool) -> list[Block]:
    chosen = [b for b in blocks() if b.language in ("bash", "python") and b.not_run is None]
    if cheap_only:
        return [b for b in chosen if b.cheap]
    return [b for b in chosen if not b.cheap or b.sets_up]


def _project(root: Path) -> Path:
    project = root / "project"
    project.mkdir()
    for name in ("llava_cli", "recipes", "tests"):
        os.symlink(ROOT / name, project / name)
    return project


def _run_block(project: Path, block: Block) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "LLAVA_CLI_CACHE": str(project.parent / "cache")}
    if block.language == "python":
        script = project.parent / f"block_{block.line}.py"
        script.write_text(block.text)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (f"{block.where} failed:\n{block.text}\n{done.stdout[-2000:]}\n"
                                  f"{done.stderr[-3000:]}")
    if 'echo "exit status: $?"' in block.text:  # a block that shows a refusal: exit status 2
        assert "exit status: 2" in done.stdout, f"{block.where}: {done.stdout[-2000:]}"
    return done.stdout


def test_every_block_runs_here_or_says_why_not():
    found = blocks()
    assert len(documents()) >= 12, "README.md and the guides in docs/"
    for block in found:
        assert block.language not in ("sh", "shell", "console", "zsh"), (
            f"{block.where}: write command blocks as ```bash so that they are run")
        if block.not_run is not None:
            assert len(block.not_run.split()) >= 2, f"{block.where}: say why it is not run here"
    run_here = [b for b in found if b.language in ("bash", "python") and b.not_run is None]
    assert len(run_here) >= 20, [b.where for b in run_here]


def test_the_readme_is_a_front_door_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for path in documents():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if target.startswith(("http://", "https://")) or target.endswith("settings.md"):
                continue  # docs/settings.md is generated from the settings declaration
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"
    for guide in ORDER:
        assert f"(docs/{guide}.md)" in readme, f"README does not link docs/{guide}.md"


def test_the_cheap_blocks_run_as_written(tmp_path):
    project = _project(tmp_path)
    cheap = runnable(cheap_only=True)
    assert any("inspect-data" in b.text for b in cheap)
    for block in cheap:
        _run_block(project, block)
    assert (project / "mydata" / "records.json").is_file()


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path):
    project = _project(tmp_path)
    for block in runnable(cheap_only=False):
        _run_block(project, block)
    runs = project / "runs" / "my"
    assert (runs / "pretrain" / "projector.safetensors").is_file()
    assert (runs / "merged" / "model.safetensors").is_file()
    assert (runs / "qlora-merged" / "model.safetensors").is_file()
    assert (runs / "dpo" / "adapter_model.safetensors").is_file()
    assert (project / "mm_projector.bin").is_file()
    answers = [json.loads(line) for line in (project / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == len(json.loads((project / "mydata/records.json").read_text()))


# The LLaVA-1.5 recipes, which the guides show as not run here (GPUs, the hub).
CPU_TRAINING = ["--max-steps", "2", "--set", "tf32=false"]
RECIPE_COMMANDS = (
    "llava pretrain recipes/llava-v1.5-7b/pretrain.yaml",
    "torchrun --nproc_per_node 8 -m llava_cli finetune recipes/llava-v1.5-7b/finetune.yaml",
    "llava lora recipes/llava-v1.5-7b/lora.yaml",
    "llava pretrain recipes/llava-v1.5-13b/pretrain.yaml",
    "llava finetune recipes/llava-v1.5-13b/finetune.yaml",
    "llava lora recipes/llava-v1.5-13b/lora.yaml",
)


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


def _recipe_world(root: Path) -> Path:
    world = root / "world"
    shutil.copytree(ROOT / "recipes", world / "recipes")
    _tiny_models(world)
    data = world / "playground" / "data"
    pretrain = _records(data / "LLaVA-Pretrain", 8, "pretrain", "")
    (data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    mix = _records(data / "mix", 12, "finetune", "mix/images/")
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(mix))
    return world


def _as_run_here(command: str) -> list[str]:
    words = command.split()
    if words[0] == "torchrun":
        words[words.index("--nproc_per_node") + 1] = "2"
        words = [str(Path(sys.executable).with_name("torchrun")), "--standalone", *words[1:]]
    else:
        words[0] = str(Path(sys.executable).with_name("llava"))
    return words + CPU_TRAINING


@pytest.mark.slow
def test_the_llava_1_5_recipes_run_with_tiny_stand_ins(tmp_path):
    world = _recipe_world(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    for command in RECIPE_COMMANDS:
        done = subprocess.run(_as_run_here(command), cwd=world, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (world / "checkpoints/llava-v1.5-7b-pretrain/projector.safetensors").is_file()
    assert (world / "checkpoints/llava-v1.5-7b/model.safetensors").is_file()
    assert (world / "checkpoints/llava-v1.5-7b-lora/adapter_model.safetensors").is_file()
    assert (world / "checkpoints/llava-v1.5-13b-lora/adapter_model.safetensors").is_file()
