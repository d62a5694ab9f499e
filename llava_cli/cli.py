"""The `llava` command line: wiring only. Each command lives in `llava_cli/commands/`.

Nothing heavy is imported here, so `llava --help` answers without loading torch.
"""

from __future__ import annotations

import sys

import typer

from llava_cli import __version__
from llava_cli.commands import (
    convert,
    demo,
    export_projector,
    generate,
    inspect_data,
    merge_lora,
    train,
)
from llava_cli.commands.boundary import guarded

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
    "merge-lora": (merge_lora.merge_lora, None),
    "inspect-data": (inspect_data.inspect_data, None),
    "export-projector": (export_projector.export_projector, None),
    "convert": (convert.convert, None),
    "generate": (generate.generate, None),
    "demo": (demo.demo, None),
}


def _register_commands() -> None:
    # Every command behind the one boundary: bad input is one line, never a traceback.
    for name, (function, help_text) in COMMANDS.items():
        app.command(name, help=help_text)(guarded(name, function))


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


def main() -> None:
    """Console-script entry point."""
    sys.argv = _strip_launcher_args(sys.argv)
    app()
