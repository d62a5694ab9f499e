"""`llava pretrain | finetune | lora`: options → configuration overrides → one library call."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llava_cli.commands.common import (
    PrintConfig,
    Recipe,
    SetOption,
    config_or_exit,
    show_config,
)

PRETRAIN_HELP = "Stage 1: align the projector (vision tower and LLM frozen, template plain)."
FINETUNE_HELP = "Stage 2: instruction-tune (full, or --lora / --bits 4|8 for LoRA/QLoRA)."
LORA_HELP = "Stage 2 with LoRA and LLaVA-1.5's LoRA defaults (r 128, alpha 256, lr 2e-4)."
DPO_HELP = ("Preference training (DPO/IPO) from a trained model on chosen/rejected pairs "
            "(--lora: the reference is the model with its adapters off).")

MODEL = "Model"
TRAINABLE = "Trainability, LoRA and quantization"
DATA = "Data"
TRAIN = "Training"
OUT = "Output"
PREFERENCE = "Preference (dpo)"
PREFERENCE_KEYS = ("beta", "loss_type", "rpo_alpha", "reference", "precompute_ref_log_probs")


def _opt(panel: str, *names: str, help: str | None = None,  # noqa: A002
         hidden: bool = False) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, hidden=hidden)


def _flag(panel: str, name: str, help: str | None = None,  # noqa: A002
          hidden: bool = False) -> Any:
    """A switch with its `--no-` form (None when neither is given)."""
    return typer.Option(f"--{name}/--no-{name}", help=help, rich_help_panel=panel,
                        hidden=hidden)


def _make_command(stage: str) -> Any:
    other = stage != "dpo"  # the preference options are dpo's alone

    def command(
        recipe: Recipe = None,
        set_: SetOption = None,
        print_config: PrintConfig = False,
        model_name_or_path: Annotated[str | None, _opt(
            MODEL, help="LLM (new model), a LLaVA checkpoint, or a pretrain output.")] = None,
        vision_tower: Annotated[str | None, _opt(MODEL, help="CLIP or SigLIP model.")] = None,
        tokenizer: Annotated[str | None, _opt(MODEL, help="Default: the model's.")] = None,
        projector_type: Annotated[str | None, _opt(MODEL, help="mlp2x_gelu (default).")] = None,
        vision_select_layer: Annotated[int | None, _opt(MODEL)] = None,
        vision_select_feature: Annotated[str | None, _opt(MODEL, help="patch | cls_patch.")] = None,
        pretrained_projector: Annotated[str | None, _opt(
            MODEL, help="Projector weights: ours, or LLaVA's mm_projector.bin.")] = None,
        random_init: Annotated[bool | None, _flag(
            MODEL, "random-init", help="LLM/vision from config, no weights (demo/tests).")
        ] = None,
        attn_implementation: Annotated[str | None, _opt(MODEL)] = None,
        torch_dtype: Annotated[str | None, _opt(MODEL)] = None,
        unfreeze_vision_tower: Annotated[bool | None, _flag(
            TRAINABLE, "unfreeze-vision-tower")] = None,
        freeze_llm: Annotated[bool | None, _flag(TRAINABLE, "freeze-llm")] = None,
        freeze_projector: Annotated[bool | None, _flag(TRAINABLE, "freeze-projector")] = None,
        projector_lr: Annotated[float | None, _opt(TRAINABLE)] = None,
        vision_tower_lr: Annotated[float | None, _opt(TRAINABLE)] = None,
        lora: Annotated[bool | None, _flag(TRAINABLE, "lora", help="LoRA on the LLM.")] = None,
        lora_r: Annotated[int | None, _opt(TRAINABLE)] = None,
        lora_alpha: Annotated[int | None, _opt(TRAINABLE)] = None,
        lora_dropout: Annotated[float | None, _opt(TRAINABLE)] = None,
        bits: Annotated[int | None, _opt(TRAINABLE, help="4 or 8: QLoRA.")] = None,
        quant_type: Annotated[str | None, _opt(TRAINABLE, help="nf4 | fp4.")] = None,
        data_path: Annotated[str | None, _opt(
            DATA, help="LLaVA .json / .jsonl, or a mix file (README: Data mixes).")] = None,
        image_folder: Annotated[str | None, _opt(DATA)] = None,
        eval_data_path: Annotated[str | None, _opt(
            DATA, help="Held-out records: eval_loss at every save.")] = None,
        eval_image_folder: Annotated[str | None, _opt(
            DATA, help="Default: --image-folder.")] = None,
        eval_generate: Annotated[str | None, _opt(
            DATA, help="A QA file (as `llava evaluate` reads) answered at each evaluation: "
            "eval_accuracy beside eval_loss.")] = None,
        template: Annotated[str | None, _opt(DATA)] = None,
        tokenization: Annotated[str | None, _opt(DATA, help="hf | llava.")] = None,
        image_aspect_ratio: Annotated[str | None, _opt(DATA, help="square | pad | anyres.")
                                      ] = None,
        model_max_length: Annotated[int | None, _opt(DATA)] = None,
        skip_bad_records: Annotated[bool | None, _flag(DATA, "skip-bad-records")] = None,
        group_by_modality_length: Annotated[bool | None, _flag(
            DATA, "group-by-modality-length")] = None,
        learning_rate: Annotated[float | None, _opt(TRAIN, "--learning-rate", "--lr")] = None,
        num_train_epochs: Annotated[float | None, _opt(TRAIN, "--epochs")] = None,
        max_steps: Annotated[int | None, _opt(TRAIN)] = None,
        per_device_train_batch_size: Annotated[int | None, _opt(TRAIN, "--batch-size")] = None,
        gradient_accumulation_steps: Annotated[int | None, _opt(TRAIN)] = None,
        warmup_ratio: Annotated[float | None, _opt(TRAIN)] = None,
        lr_scheduler_type: Annotated[str | None, _opt(TRAIN)] = None,
        weight_decay: Annotated[float | None, _opt(TRAIN)] = None,
        gradient_checkpointing: Annotated[bool | None, _flag(
            TRAIN, "gradient-checkpointing")] = None,
        bf16: Annotated[bool | None, _flag(TRAIN, "bf16")] = None,
        fp16: Annotated[bool | None, _flag(TRAIN, "fp16")] = None,
        seed: Annotated[int | None, _opt(TRAIN)] = None,
        dataloader_num_workers: Annotated[int | None, _opt(TRAIN)] = None,
        padding_free: Annotated[bool | None, _flag(
            TRAIN, "padding-free", help="Pack each batch into one row (no padding).")] = None,
        packing: Annotated[str | None, _opt(
            TRAIN, help="auto | on | off: samples packed across the batch to a token budget.")
                           ] = None,
        packing_budget: Annotated[int | None, _opt(
            TRAIN, help="Tokens per packed row (default --model-max-length).")] = None,
        deepspeed: Annotated[str | None, _opt(TRAIN, help="DeepSpeed JSON config.")] = None,
        vision_feature_cache: Annotated[str | None, _opt(
            TRAIN, "--vision-feature-cache", help="DIR caching the frozen vision tower's "
            "outputs, reused across epochs and runs (safe to delete).")] = None,
        beta: Annotated[float | None, _opt(
            PREFERENCE, help="KL strength (default 0.1).")] = None,
        loss_type: Annotated[str | None, _opt(
            PREFERENCE, help="sigmoid (DPO) | ipo.")] = None,
        rpo_alpha: Annotated[float | None, _opt(
            PREFERENCE, help="Add alpha x the chosen replies' NLL (RPO).")] = None,
        reference: Annotated[str | None, _opt(
            PREFERENCE, help="auto | copy | disabled-adapter (auto: disabled-adapter "
            "with --lora, else a frozen copy).")] = None,
        precompute_ref_log_probs: Annotated[bool | None, _flag(
            PREFERENCE, "precompute-ref-log-probs", help="Reference log-probs in one pass "
            "before training (a copy is then freed).")] = None,
        output_dir: Annotated[str | None, _opt(OUT, "--output-dir", "-o")] = None,
        overwrite: Annotated[bool | None, _flag(
            OUT, "overwrite", help="Allow writing into a non-empty output directory.")] = None,
        resume: Annotated[str | None, _opt(
            OUT, help="Continue from a checkpoint path, or 'latest' in the output dir.")] = None,
        save_steps: Annotated[int | None, _opt(OUT)] = None,
        save_total_limit: Annotated[int | None, _opt(OUT)] = None,
        logging_steps: Annotated[int | None, _opt(OUT)] = None,
        report_to: Annotated[str | None, _opt(OUT, help="none | tensorboard | wandb …")] = None,
    ) -> None:
        flags = dict(locals())
        for name in ("recipe", "set_", "print_config", "stage", "other"):
            flags.pop(name)
        if other and (given := [k for k in PREFERENCE_KEYS if flags[k] is not None]):
            raise typer.BadParameter(f"--{given[0].replace('_', '-')} is a preference "
                                     "option: use llava dpo")
        flags.update(_trainability_flags(flags))
        config = config_or_exit(stage, recipe, set_, flags)
        if print_config:
            show_config(config, stage, trainer=True)
            _notes(set_, comment=True)
            return
        _notes(set_, comment=False)
        if stage == "pretrain" and config.train_llm == "lora":
            raise typer.BadParameter("pretrain trains the projector; use finetune --lora")
        run_or_exit(stage, config)

    command.__name__ = stage
    if other:
        command.__signature__ = _preference_options_hidden(command)  # type: ignore[attr-defined]
    return command


def _preference_options_hidden(command: Any) -> Any:
    """`command`'s signature with the preference options hidden from its --help (given
    anyway, they are refused)."""
    import copy
    import inspect
    from typing import get_args

    signature = inspect.signature(command, eval_str=True)
    params = []
    for param in signature.parameters.values():
        if param.name in PREFERENCE_KEYS:
            kind, option = get_args(param.annotation)
            option = copy.copy(option)
            option.hidden = True
            param = param.replace(annotation=Annotated[kind, option])
        params.append(param)
    return signature.replace(parameters=params)


def _notes(sets: list[str] | None, comment: bool) -> None:
    """Once per run (on the first rank): the original arguments accepted with no effect, and
    why — as YAML comments after `--print-config`'s output, else on stderr."""
    from llava_cli.artifacts.ranks import is_main_process
    from llava_cli.config.original_args import notes_for

    if not is_main_process():
        return
    for note in notes_for(item.partition("=")[0].strip() for item in sets or []):
        typer.echo(f"# note: {note}" if comment else f"note: {note}", err=not comment)


def _trainability_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The boolean switches → the per-component trainability keys (None: not given; the
    `--no-…` forms undo a recipe's setting: `--no-lora` trains the LLM in full)."""
    lora, freeze_llm = flags.pop("lora"), flags.pop("freeze_llm")
    if lora and freeze_llm:
        raise typer.BadParameter("--lora trains the LLM with LoRA; drop --freeze-llm")
    llm = ("lora" if lora else "frozen" if freeze_llm
           else "full" if False in (lora, freeze_llm) else None)
    return {
        "train_llm": llm,
        "train_vision_tower": _switch(flags.pop("unfreeze_vision_tower"), "full", "frozen"),
        "train_projector": _switch(flags.pop("freeze_projector"), "frozen", "full"),
    }


def _switch(value: bool | None, on: str, off: str) -> str | None:
    return None if value is None else on if value else off


def run_or_exit(stage: str, config: Any) -> None:
    """Run training; a configuration or data problem ends with status 2 and its message
    (printed by the command boundary, on the reporting rank only)."""
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.train.process import process_group_closed_at_end
    from llava_cli.train.reporting import Reporter
    from llava_cli.train.run import run_training

    quiet_libraries()
    reporter = Reporter()
    try:
        with process_group_closed_at_end():
            result = run_training(config, reporter)
            kind, output_dir = result.kind, result.output_dir
            # The finished trainer holds DDP's reducer, which holds the process group: let
            # it go first, or the group outlives its destruction below (see the helper).
            del result
    except (ValueError, OSError, NotImplementedError):  # OSError: a path, a hub id, a disk
        if reporter.enabled:
            raise  # the command boundary prints it (once: on the rank that reports)
        raise typer.Exit(2) from None
    if reporter.enabled:
        reporter.console.print(f"[green]done[/]: {kind} output in {output_dir}")


pretrain = _make_command("pretrain")
finetune = _make_command("finetune")
lora = _make_command("lora")
dpo = _make_command("dpo")
