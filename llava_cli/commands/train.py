"""`llava pretrain | finetune | lora`: options → configuration overrides → one library call."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, NamedTuple

import typer

from llava_cli.commands.common import (
    PrintConfig,
    Recipe,
    SetOption,
    config_or_exit,
    given_values,
    setting_option,
    show_config,
)
from llava_cli.config.declared import DeclaredSetting, declared_settings
from llava_cli.config.input_paths import refuse_missing_inputs
from llava_cli.config.setting import TRAINABLE

PRETRAIN_HELP = ("Stage 1: align the projector (vision tower and LLM frozen, template plain); "
                 "defaults are LLaVA-1.5's stage 1 (lr 1e-3, 1 epoch, cosine).")
FINETUNE_HELP = ("Stage 2: instruction-tune (full, or --lora / --bits 4|8 for LoRA/QLoRA); "
                 "defaults are LLaVA-1.5's stage 2 (lr 2e-5, 1 epoch, cosine).")
LORA_HELP = ("Stage 2 with LoRA and LLaVA-1.5's LoRA defaults (r 128, alpha 256, lr 2e-4, "
             "projector lr 2e-5).")
DPO_HELP = ("Preference training (DPO/IPO) from a trained model on chosen/rejected pairs "
            "(--lora: the reference is the model with its adapters off); defaults are "
            "LLaVA-NeXT's DPO script (lr 5e-7, beta 0.1).")


class Switch(NamedTuple):
    """A shorthand option for one value of a declared setting (`--lora` is train_llm lora);
    `--no-…` sets `off`."""

    name: str
    setting: str
    on: str
    off: str
    help: str


SWITCHES = (
    Switch("lora", "train_llm", "lora", "full", "LoRA on the LLM (train_llm lora)."),
    Switch("freeze_llm", "train_llm", "frozen", "full", "Freeze the LLM (train_llm frozen)."),
    Switch("unfreeze_vision_tower", "train_vision_tower", "full", "frozen",
           "Train the whole vision tower (train_vision_tower full)."),
    Switch("freeze_projector", "train_projector", "frozen", "full",
           "Freeze the projector (train_projector frozen)."),
)


def _option(declared: DeclaredSetting, stage: str) -> inspect.Parameter:
    """The parameter of one declared setting's option; hidden on commands that do not offer
    it (given anyway, it is refused)."""
    annotation = setting_option(declared, stage, offered=stage in declared.setting.commands)
    return inspect.Parameter(declared.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=annotation)


def _switch_option(switch: Switch, stage: str, defaults: dict[str, str]) -> inspect.Parameter:
    dashed = switch.name.replace("_", "-")
    state = "on" if defaults[switch.setting] == switch.on else "off"
    option = typer.Option(f"--{dashed}/--no-{dashed}", show_default=False,
                          help=f"{switch.help} [default: {state}]",
                          rich_help_panel=TRAINABLE)
    return inspect.Parameter(switch.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[bool | None, option])


def _make_command(stage: str) -> Any:
    """The `stage` command: its options made from the declared settings (`config.declared`)."""
    settings = [s for s in declared_settings() if s.setting.flag]
    by_name = {s.name: s for s in settings}
    defaults = {name: by_name[name].shown_default(stage) for name in
                {switch.setting for switch in SWITCHES}}
    offered_elsewhere = {s.name for s in settings if stage not in s.setting.commands}

    def command(**given: Any) -> None:
        recipe, sets, print_config = given.pop("recipe"), given.pop("set_"), \
            given.pop("print_config")
        if refused := [k for k in offered_elsewhere if given.get(k) is not None]:
            name = by_name[refused[0]]
            raise typer.BadParameter(f"{name.option_names[0]} is a "
                                     f"{' and '.join(name.setting.commands)} option: use "
                                     f"llava {name.setting.commands[0]}")
        given = given_values(given)
        given.update(_switched(given))
        config = config_or_exit(stage, recipe, sets, given)
        if print_config:
            show_config(config, stage, trainer=True)
            _notes(sets, comment=True)
            return
        _notes(sets, comment=False)
        refuse_missing_inputs(config)  # before torch: a typo in a path answers at once
        if stage == "pretrain" and config.train_llm == "lora":
            raise typer.BadParameter("pretrain trains the projector; use finetune --lora")
        run_or_exit(stage, config)

    fixed = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                               annotation=kind)
             for name, kind, default in (("recipe", Recipe, None), ("set_", SetOption, None),
                                         ("print_config", PrintConfig, False))]
    options = [_option(s, stage) for s in settings]
    switches = [_switch_option(switch, stage, defaults) for switch in SWITCHES]
    # the recipe is positional: first, so Typer reads it as the argument
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [fixed[0].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD), *fixed[1:],
         *options, *switches])
    command.__name__ = stage
    return command


def _notes(sets: list[str] | None, comment: bool) -> None:
    """Once per run (on the first rank): the original arguments accepted with no effect, and
    why — as YAML comments after `--print-config`'s output, else on stderr."""
    from llava_cli.artifacts.ranks import is_main_process
    from llava_cli.config.original_args import notes_for

    if not is_main_process():
        return
    for note in notes_for(item.partition("=")[0].strip() for item in sets or []):
        typer.echo(f"# note: {note}" if comment else f"note: {note}", err=not comment)


def _switched(given: dict[str, Any]) -> dict[str, Any]:
    """The shorthand switches given → the settings they set (None: not given; `--no-…`
    undoes a recipe's setting: `--no-lora` trains the LLM in full)."""
    values = {switch.name: given.pop(switch.name) for switch in SWITCHES}
    if values["lora"] and values["freeze_llm"]:
        raise typer.BadParameter("--lora trains the LLM with LoRA; drop --freeze-llm")
    out: dict[str, Any] = {}
    for switch in SWITCHES:
        value = values[switch.name]
        if value is not None and out.get(switch.setting) is None:
            out[switch.setting] = switch.on if value else switch.off
    if values["lora"] is False and values["freeze_llm"]:
        out["train_llm"] = "frozen"
    for setting, value in out.items():
        if given.get(setting) is not None and given[setting] != value:
            raise typer.BadParameter(f"--{setting.replace('_', '-')} {given[setting]} and "
                                     f"its shorthand disagree; give one")
    return {k: v for k, v in out.items() if given.get(k) is None}


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
