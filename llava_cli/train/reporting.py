"""What a training run shows: a one-screen summary, Rich progress, loss lines (rank 0 only)."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers import TrainerCallback

from llava_cli.artifacts.ranks import is_main_process


class Reporter:
    """Prints to the terminal from the main process only; other ranks stay quiet."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = is_main_process()
        if not self.enabled:  # other ranks: no progress bars or info logs from transformers
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()

    def summary(self, config: Any, kind: str, counts: dict[str, int], dataset: Any,
                args: Any, held_out: Any = None, weights: str | None = None,
                lora_layers: list[str] | None = None, started: str | None = None,
                threads: str | None = None) -> None:
        """Trainable parameters per component, data counts, effective batch, output kind,
        the dtype the weights are in (`weights`), the layers given LoRA adapters and, when it
        needs saying, what the starting model was converted from (`started`)."""
        if not self.enabled:
            return
        table = Table(title="llava training run", title_justify="left", show_header=False)
        if started:
            table.add_row("starting model", started)
        if config.resume:
            table.add_row("resumed from", resumed_from(config, args.output_dir))
        for part, n in counts.items():
            table.add_row(f"trainable {part}", f"{n:,}")
        if lora_layers:
            table.add_row("LoRA on", lora_summary(lora_layers))
        if weights:
            why = (" (the bf16 training dtype; --torch-dtype float32 keeps float32)"
                   if weights == "bfloat16" and not config.torch_dtype else "")
            table.add_row("weights", f"{weights}{why}")
        images, records = int(dataset.index.has_image.sum()), len(dataset.index)
        table.add_row("records", f"{records:,} ({images:,} with images, "
                      f"{records - images:,} text-only)")
        if config.objective == "dpo":
            table.add_row("objective", _preference_line(config))
        else:
            table.add_row("packing", _packing_line(config, dataset))
        strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
        when = {"steps": f"every {args.eval_steps} steps", "epoch": "every epoch",
                "no": "never (eval_strategy no)"}[strategy]
        if held_out is not None:
            table.add_row("evaluation", f"{len(held_out):,} records, eval_loss {when}")
        if getattr(args, "eval_generate", None):
            table.add_row("answers evaluated", f"{args.eval_generate}, eval_accuracy {when}")
        effective = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                     * args.world_size)
        table.add_row("effective batch", f"{effective} (per device "
                      f"{args.per_device_train_batch_size} × accumulation "
                      f"{args.gradient_accumulation_steps} × {args.world_size} process(es))")
        table.add_row("template / tokenization", f"{config.template} / {config.tokenization}")
        if config.vision_feature_cache:
            table.add_row("vision feature cache", config.vision_feature_cache)
        if threads:
            table.add_row("CPU threads", threads)
        table.add_row("output", f"{kind} → {args.output_dir}")
        self.console.print(table)

    def callback(self) -> TrainerCallback:
        """A Trainer callback that drives the progress bar and prints logged metrics."""
        return _RichCallback(self)


def resumed_from(config: Any, output_dir: str) -> str:
    """'/out/checkpoint-4 (step 4 of --resume latest)': the checkpoint a resumed run continues."""
    import json
    from pathlib import Path

    from llava_cli.train.outputs import resume_checkpoint

    checkpoint = resume_checkpoint(config, Path(output_dir))
    try:
        step = json.loads((Path(str(checkpoint)) / "trainer_state.json").read_text())
        at = f"step {int(step['global_step'])}"
    except (OSError, ValueError, KeyError, TypeError):
        at = "step unknown"
    how = "--resume latest" if config.resume == "latest" else "--resume"
    return f"{checkpoint} ({at}, {how})"


def _preference_line(config: Any) -> str:
    """'dpo: sigmoid, beta 0.1 (+ rpo_alpha 0.5); reference: disabled-adapter, precomputed'."""
    rpo = f" + rpo_alpha {config.rpo_alpha}" if config.rpo_alpha is not None else ""
    when = ", precomputed before training" if config.precompute_ref_log_probs else ""
    return (f"dpo: {config.loss_type}, beta {config.beta}{rpo}; reference: "
            f"{config.reference_kind}{when}; records are pairs")


def _packing_line(config: Any, dataset: Any) -> str:
    """'on (auto: …): 1,234 rows of ≤ 2048 tokens, 3.1 samples a row' or 'off (…)'."""
    on, why = config.packing_choice
    if not on:
        return f"off ({why})"
    budget = config.packing_budget or config.model_max_length
    rows = len(dataset)
    return (f"on ({why}, layout {config.packing_layout}): {rows:,} rows of ≤ {budget} tokens, "
            f"{len(dataset.index) / max(rows, 1):.1f} samples a row")


def lora_summary(layers: list[str]) -> str:
    """'14 linear layers: down_proj ×2, …' — how many layers of each kind got adapters."""
    kinds: dict[str, int] = {}
    for name in layers:
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{len(layers)} linear layers: " + ", ".join(
        f"{kind} ×{count}" for kind, count in sorted(kinds.items()))


# dpo's statistics worth a console line (training and held-out): how far apart the rewards
# of chosen and rejected replies are, and how often the chosen one wins.
SHOWN_REWARDS = ("rewards/margins", "rewards/accuracies")


class _RichCallback(TrainerCallback):
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not (self.reporter.enabled and state.is_world_process_zero):
            return
        self.progress = Progress(TextColumn("training"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} steps"),
                                 TimeRemainingColumn(), console=self.reporter.console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps,
                                           completed=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        if self.progress is None or not logs:
            return
        shown = {k: v for k, v in logs.items()
                 if k in ("loss", "learning_rate", "grad_norm", "train_loss", "eval_loss", "epoch")
                 or k.startswith(("learning_rate_", "eval_accuracy"))
                 or k.endswith(SHOWN_REWARDS)}
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in shown.items())
        self.progress.console.print(f"step {state.global_step}: {text}", highlight=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def report_dropped(trainer: Any) -> int:
    """Warn (on rank 0) how many distinct records training left out and why; return the
    count. Collective under torch.distributed (every rank calls it)."""
    dropped = trainer.dropped_records()
    if dropped.total and trainer.is_world_process_zero():
        logging.getLogger("llava_cli").warning(
            "%d record(s) were dropped from training and never trained on: %s. `llava "
            "inspect-data --check` on the data lists them all.", dropped.total,
            dropped.summary())
    return dropped.total
