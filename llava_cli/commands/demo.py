"""`llava demo`: the whole pipeline on a tiny model, then an accuracy table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from llava_cli.demo.pipeline import DemoResult

QUESTION_NAMES = {"color": "shape colour", "side": "left / right", "background": "background"}


def demo(
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", help="Where data, models, eval.json and loss.png go.")
    ] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(
        "--quick",
        help="A smoke run: fewer pictures and steps, finetune on colour only (~1-2 minutes).",
    )] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Allow writing into a non-empty output directory.")] = False,
) -> None:
    """Train a tiny LLaVA from scratch on CPU through every stage and show what it learnt.

    Generates pictures of coloured shapes, then runs pretrain → finetune → lora → merge-lora →
    dpo → export-projector → inspect-data with the demo's recipes (each stage prints the
    llava command that does the same), then asks the finetuned and the merged model questions
    about pictures they never saw, and scores the dpo stage's held-out preference accuracy.
    No GPU and no downloads needed (~9 minutes; --quick ~2).
    """
    from rich.console import Console

    from llava_cli.demo.pipeline import run_demo

    console = Console()
    result = run_demo(output_dir, quick=quick, overwrite=overwrite, console=console)
    print_summary(console, result)


def print_summary(console: Any, result: DemoResult) -> None:
    """Accuracy per question and model, a few example answers, the stage timings."""
    from rich.table import Table

    console.rule("[bold]results")
    table = Table(title="accuracy on unseen pictures (greedy answers)", title_justify="left")
    table.add_column("question")
    for model in result.accuracy:
        table.add_column(model, justify="right")
    for question, name in QUESTION_NAMES.items():
        table.add_row(name, *(f"{acc[question]:.0%}" for acc in result.accuracy.values()))
    console.print(table)
    examples = Table(title="examples", title_justify="left")
    for column in ("image", "question", "truth", *result.accuracy):
        examples.add_column(column)
    for row in result.examples:
        examples.add_row(row["image"], QUESTION_NAMES[row["question"]], row["truth"],
                         *(_mark(row[m], row["truth"]) for m in result.accuracy))
    console.print(examples)
    check = result.stock_check
    console.print(f"stock transformers (LlavaForConditionalGeneration + AutoProcessor) on "
                  f"{check['id']}: {check['stock_transformers']!r} — "
                  f"{'same as' if check['same'] else 'DIFFERENT from'} the llava_cli answer")
    if result.preference:
        before, after = result.preference.get("merged", 0.0), result.preference.get("dpo", 0.0)
        console.print(f"preference accuracy on held-out pairs (\"What shape is it?\", chosen "
                      f"log-prob above rejected; chance 50%): before dpo {before:.0%}, "
                      f"after {after:.0%}")
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
    console.print(f"time: {seconds}; CPU time {result.cpu_seconds / 60:.1f} min (this process "
                  "and its dataloader workers)")
    out = result.output_dir
    console.print(f"written: {out / 'eval.json'}, {out / 'loss.png'}, models in "
                  f"{out}/{{finetune,lora,merged,dpo}}")


def _mark(answer: str, truth: str) -> str:
    from llava_cli.demo.measure import is_correct

    return f"[green]{answer}[/]" if is_correct(answer, truth) else f"[red]{answer or '∅'}[/]"
