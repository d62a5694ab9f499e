"""`llava demo`: every stage on a tiny random-init LLaVA, then proof that it learnt.

Data (`shapes.generate_split`) → pretrain → finetune (vision tower unfrozen: a from-scratch
tower must learn to see) → lora (a new question: the background colour) → merge-lora → dpo
(another new question, the shape's name, taught by preference pairs alone) →
export-projector → inspect-data → greedy evaluation and held-out preference accuracy on
separate splits. Each stage prints the
`llava …` command line that does the same and then runs the library function that command
runs, with the recipes in `demo/recipes/` (package data) — so the demo is also an end-to-end
test of the code paths users call.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).resolve().parent / "recipes"  # package data: installed with llava_cli
REPO_RECIPES = Path("llava_cli") / "demo" / "recipes"  # the same files, seen from a checkout
STAGES = ("pretrain", "finetune", "lora")
STARTS_FROM = {"finetune": "pretrain", "lora": "finetune", "dpo": "merged"}  # starting models
SPLIT_KINDS = {"dpo_eval": "dpo"}  # a split's kind where it is not its name


@dataclass(frozen=True)
class DemoPlan:
    """How much data and training: pictures per split and max_steps per stage (None: recipe)."""

    pictures: dict[str, int]
    steps: dict[str, int | None]
    examples: int = 4
    sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra --set per stage
    questions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per split, if not all


FULL = DemoPlan(pictures={"pretrain": 1000, "finetune": 8000, "lora": 2000, "eval": 150,
                          "dpo": 1200, "dpo_eval": 150},
                steps={"pretrain": None, "finetune": None, "lora": None, "dpo": None})
QUICK = DemoPlan(pictures={"pretrain": 200, "finetune": 1200, "lora": 400, "eval": 20,
                           "dpo": 200, "dpo_eval": 30},
                 steps={"pretrain": 10, "finetune": 100, "lora": 30, "dpo": 10},
                 # A smoke run: 100 steps learn colour only if that is all they are asked
                 # (and at 1e-3; the full recipe's 3e-4 needs its 1,000 steps).
                 sets={"finetune": ("learning_rate=1e-3",)},
                 questions={"finetune": ("color",)})
SEEDS = {"pretrain": 0, "finetune": 0, "lora": 0, "eval": 1, "dpo": 0,
         "dpo_eval": 1}  # held-out splits: a different seed


@dataclass
class DemoResult:
    """What a demo run produced (also written to OUTPUT/eval.json)."""

    output_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # model → question → acc
    examples: list[dict[str, Any]] = field(default_factory=list)
    stock_check: dict[str, Any] = field(default_factory=dict)
    preference: dict[str, float] = field(default_factory=dict)  # model → held-out accuracy
    cpu_seconds: float = 0.0  # this process and its dataloader workers


def _rel(path: Path) -> str:
    """`path` relative to the working directory when it is inside it (shorter commands)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless `overwrite` (as the training commands do)."""
    from llava_cli.artifacts.output_dir import refuse_unsafe_output_dir

    refuse_unsafe_output_dir(output_dir, overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)


class Demo:
    """One demo run: the plan, the output directory and where to print."""

    def __init__(self, output_dir: Path, plan: DemoPlan, console: Any) -> None:
        self.out, self.plan, self.console = output_dir, plan, console
        self.result = DemoResult(output_dir)

    def step(self, title: str, argv: list[str] | None, work: Callable[[], Any]) -> Any:
        """Announce a stage and its replayable command, run it, and time it."""
        self.console.rule(f"[bold]{title}")
        if argv:
            self.console.print(f"$ {shlex.join(argv)}", style="cyan", highlight=False,
                               soft_wrap=True)
        start = time.perf_counter()
        value = work()
        self.result.seconds[title] = round(time.perf_counter() - start, 1)
        return value

    def generate_data(self) -> None:
        """Train splits and an evaluation split from a different seed (unseen pictures)."""
        from llava_cli.demo.shapes import generate_split

        def work() -> None:
            from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

            # The built-in tokenizer saved as a folder: the bare name `demo` would be read as
            # a path wherever one of that name exists (`llava demo -o demo` makes one).
            build_demo_tokenizer().save_pretrained(str(self.out / "data" / "tokenizer"))
            for kind, n in self.plan.pictures.items():
                generate_split(self.out / "data" / kind, n, SEEDS[kind],
                               SPLIT_KINDS.get(kind, kind),  # type: ignore[arg-type]
                               self.plan.questions.get(kind))
                self.console.print(f"{kind}: {n} pictures (seed {SEEDS[kind]}) in "
                                   f"{_rel(self.out / 'data' / kind)}")
        self.console.print("python -c 'from llava_cli.demo.shapes import generate_split; "
                           "generate_split(FOLDER, N, SEED, KIND)' for each split",
                           style="dim", highlight=False)
        self.step("data", None, work)

    def train_sets(self, stage: str) -> list[str]:
        """The `--set` items of a training stage: the demo's data, output and start model."""
        data = self.out / "data" / stage
        sets = [f"data_path={_rel(data / 'records.json')}", f"image_folder={_rel(data)}",
                f"output_dir={_rel(self.out / stage)}"]
        if stage in STARTS_FROM:
            sets.append(f"model_name_or_path={_rel(self.out / STARTS_FROM[stage])}")
        else:  # a new model: the demo tokenizer, from its folder (see `generate_data`)
            sets.append(f"tokenizer={_rel(self.out / 'data' / 'tokenizer')}")
            if RECIPES.resolve() != (Path.cwd() / REPO_RECIPES).resolve():
                # Recipe paths are relative to the repository root; elsewhere, name the parts.
                sets += [f"model_name_or_path={_rel(RECIPES / 'llm')}",
                         f"vision_tower={_rel(RECIPES / 'vision')}"]
        if self.plan.steps.get(stage) is not None:
            sets.append(f"max_steps={self.plan.steps[stage]}")
        return sets + list(self.plan.sets.get(stage, ()))

    def train(self, stage: str) -> None:
        """`llava STAGE …/demo/recipes/STAGE.yaml --set … --overwrite` through run_training."""
        from llava_cli.config.resolve import resolve_config
        from llava_cli.train.reporting import Reporter
        from llava_cli.train.run import run_training

        recipe = _rel(RECIPES / f"{stage}.yaml")
        sets = self.train_sets(stage)
        argv = ["llava", stage, recipe, *[a for s in sets for a in ("--set", s)], "--overwrite"]
        config = resolve_config(stage, recipe, sets, {"overwrite": True})
        result = self.step(stage, argv, lambda: run_training(config, Reporter(self.console)))
        self.console.print(f"{stage}: {result.kind} output in {_rel(result.output_dir)} "
                           f"(final loss {result.metrics.get('train_loss', float('nan')):.3f})")

    def merge(self) -> None:
        """`llava merge-lora OUT/lora --output-dir OUT/merged --overwrite` (verified)."""
        from llava_cli.merge.merge import describe, merge_lora

        run_dir, target = self.out / "lora", self.out / "merged"
        argv = ["llava", "merge-lora", _rel(run_dir), "--output-dir", _rel(target), "--overwrite"]
        result = self.step("merge-lora", argv, lambda: merge_lora(
            run_dir, target, overwrite=True, log=self.console.print))
        self.console.print(describe(result))

    def export(self) -> None:
        """`llava export-projector OUT/merged --output OUT/projector.bin` (LLaVA format)."""
        from llava_cli.artifacts.export import export_projector

        source, target = self.out / "merged", self.out / "projector.bin"
        argv = ["llava", "export-projector", _rel(source), "--output", _rel(target),
                "--overwrite"]  # as every stage: a rerun replaces its outputs
        result = self.step("export-projector", argv,
                           lambda: export_projector(source, target, overwrite=True))
        self.console.print(f"projector ({result.format}: {', '.join(result.keys)})")

    def inspect(self) -> None:
        """`llava inspect-data` on one LoRA record with the merged model's tokenizer."""
        from llava_cli.config.resolve import resolve_config
        from llava_cli.inspect.inspection import InspectRequest, inspect_data

        data = self.out / "data" / "lora"
        flags = {"data_path": _rel(data / "records.json"), "image_folder": _rel(data),
                 "model_name_or_path": _rel(self.out / "merged"), "template": "v1"}
        argv = ["llava", "inspect-data", flags["data_path"], "--image-folder",
                flags["image_folder"], "--model", flags["model_name_or_path"], "--template",
                "v1", "--index", "0"]
        config = resolve_config("inspect-data", None, None, flags)
        self.step("inspect-data", argv, lambda: inspect_data(config, InspectRequest(index=0)))

    def evaluate(self) -> None:
        """Greedy answers of the finetuned and the merged model on the evaluation split."""
        from llava_cli.demo.measure import evaluation_records, score
        from llava_cli.generation.answering_model import load_for_generation

        folder = self.out / "data" / "eval"
        records = evaluation_records(folder)

        def work() -> dict[str, Any]:
            return {name: score(load_for_generation(self.out / name), folder, records)
                    for name in ("finetune", "merged")}
        self.console.print(f"greedy answers to {len(records)} questions about "
                           f"{len(records) // 3} unseen pictures; replay one with: llava "
                           f"generate {_rel(self.out / 'merged')} --image IMAGE --prompt "
                           "'What color is the shape?'", style="dim", highlight=False)
        scores = self.step("evaluate", None, work)
        self.result.accuracy = {name: s.accuracy() for name, s in scores.items()}
        self.result.examples = _examples(records, scores, self.plan.examples)
        self.stock_check(folder, records[0])

    def stock_check(self, folder: Path, record: dict[str, Any]) -> None:
        """The merged model through stock transformers gives the answer our Generator gave."""
        from PIL import Image

        from llava_cli.demo.measure import question_of, stock_answer

        with Image.open(folder / record["image"]) as image:
            stock = stock_answer(self.out / "merged", image.convert("RGB"), question_of(record))
        ours = next(e["merged"] for e in self.result.examples if e["id"] == record["id"])
        self.result.stock_check = {"id": record["id"], "question": question_of(record),
                                   "generator": ours, "stock_transformers": stock,
                                   "same": ours == stock}

    def score_preferences(self) -> None:
        """Held-out preference accuracy of the merged model (before dpo) and the DPO output."""
        from llava_cli.demo.preference_score import preference_scores

        data = self.out / "data" / "dpo_eval"
        self.console.print(f"chosen vs rejected log-probability on {self.plan.pictures['dpo_eval']}"
                           " held-out pairs (\"What shape is it?\")", style="dim")
        self.result.preference = self.step("preference accuracy", None,
                                           lambda: preference_scores(self.out, data))

    def plot(self) -> None:
        """Loss curves of the training stages → OUT/loss.png."""
        from llava_cli.demo.measure import losses, plot_losses

        target = plot_losses({s: losses(self.out / s) for s in (*STAGES, "dpo")},
                             self.out / "loss.png")
        self.console.print(f"loss curves: {_rel(target)}")


def _examples(records: list[dict[str, Any]], scores: dict[str, Any], n: int
              ) -> list[dict[str, Any]]:
    """The first `n` pictures' questions with the truth and both models' answers."""
    pictures = list(dict.fromkeys(r["image"] for r in records))[:n]
    return [{"id": r["id"], "image": r["image"], "question": r["question_type"],
             "truth": r["answer"], **{name: s.answers[r["id"]] for name, s in scores.items()}}
            for r in records if r["image"] in pictures]


def run_demo(output_dir: str | Path, quick: bool = False, overwrite: bool = False,
             console: Any = None) -> DemoResult:
    """Run the whole demo into `output_dir`; write eval.json and loss.png; return the result.
    The demo sets its own CPU threads: one per process (what its figures were measured with),
    unless OMP_NUM_THREADS says otherwise."""
    import os

    import torch
    from rich.console import Console

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from llava_cli.demo.preference_score import cpu_seconds

    out, cpu_start = Path(output_dir), cpu_seconds()
    check_output_dir(out, overwrite)
    demo = Demo(out, QUICK if quick else FULL, console or Console())
    start = time.perf_counter()
    demo.generate_data()
    for stage in STAGES:
        demo.train(stage)
    demo.merge()
    demo.train("dpo")
    demo.export()
    demo.inspect()
    demo.evaluate()
    demo.score_preferences()
    demo.plot()
    demo.result.seconds["total"] = round(time.perf_counter() - start, 1)
    demo.result.cpu_seconds = round(cpu_seconds() - cpu_start, 1)
    write_result(demo.result, quick)
    return demo.result


def write_result(result: DemoResult, quick: bool) -> Path:
    """OUT/eval.json: accuracies per model and question, examples, timings, stock check."""
    from llava_cli.artifacts.files import write_text_atomically

    return write_text_atomically(result.output_dir / "eval.json", json.dumps({
        "mode": "quick" if quick else "full", "accuracy": result.accuracy,
        "examples": result.examples, "stock_check": result.stock_check,
        "preference_accuracy": result.preference, "seconds": result.seconds,
        "cpu_seconds": result.cpu_seconds}, indent=2) + "\n")
