"""The `llava` command line: wiring only. Each command lives in `llava_cli/commands/`.

Nothing heavy is imported here, so `llava --help` answers without loading torch.
"""

from __future__ import annotations

import sys

import typer

from llava_cli import __version__
from llava_cli.commands import (
    chat,
    convert,
    demo,
    evaluate,
    export_projector,
    generate,
    inspect_data,
    merge_lora,
    recipe_from_script,
    train,
)
from llava_cli.commands.boundary import guarded
from llava_cli.commands.help_layout import PanelledCommand

app = typer.Typer(
    name="llava",
    help="Train LLaVA-style vision-language models (vision tower + projector + LLM) whose "
    "outputs load in stock transformers and vLLM.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llava {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Train LLaVA-style vision-language models."""


COMMANDS = {
    "pretrain": (train.pretrain, train.PRETRAIN_HELP),
    "finetune": (train.finetune, train.FINETUNE_HELP),
    "lora": (train.lora, train.LORA_HELP),
    "dpo": (train.dpo, train.DPO_HELP),
    "merge-lora": (merge_lora.merge_lora, None),
    "inspect-data": (inspect_data.inspect_data, None),
    "export-projector": (export_projector.export_projector, None),
    "convert": (convert.convert, None),
    "generate": (generate.generate, None),
    "chat": (chat.chat, None),
    "evaluate": (evaluate.evaluate, None),
    "demo": (demo.demo, None),
    "recipe-from-script": (recipe_from_script.recipe_from_script, None),
}
# The commands that accept the original train.py's arguments as its scripts write them.
TRAINING_COMMANDS = ("pretrain", "finetune", "lora")


def _register_commands() -> None:
    # Every command behind the one boundary: bad input is one line, never a traceback.
    for name, (function, help_text) in COMMANDS.items():
        app.command(name, help=help_text, cls=PanelledCommand)(guarded(name, function))


_register_commands()


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends `--local_rank=N`; it is in the environment anyway."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def _original_args_normalised(argv: list[str]) -> list[str]:
    """For a training command, the original LLaVA/InternVL spellings (`--snake_case True`)
    turned into ours (`config.original_args`); any other command line is unchanged."""
    from llava_cli.config.original_args import OptionSpec, normalise_argv

    at = next((i for i, arg in enumerate(argv) if i and not arg.startswith("-")), None)
    if at is None or argv[at] not in TRAINING_COMMANDS:
        return argv
    command = typer.main.get_command(app).commands[argv[at]]  # type: ignore[attr-defined]
    return argv[: at + 1] + normalise_argv(argv[at + 1:], OptionSpec.of(command))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`argv`: the whole command line, program name first; by
    default `sys.argv`)."""
    words = _original_args_normalised(_strip_launcher_args(sys.argv if argv is None else argv))
    if argv is None:
        sys.argv = words  # as before: what later readers of sys.argv see
    app(args=words[1:], prog_name="llava")
