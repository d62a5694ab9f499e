"""What a setting is, beside its type and default: its help, where `--help` shows it, its
command-line names, its default per stage, and which commands offer it.

A setting is declared once — a `RunConfig` field annotated with a `Setting`, or a
`TrainingArguments` field named in `run_config.TRAINER_SETTINGS` — and everything else is
derived from that declaration (`config.declared`): each command's options and `--help`, the
stage presets, recipe and `--set` validation, `--print-config`, the saved `llava_config.yaml`,
the Trainer's arguments and `docs/settings.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The training commands, in the order LLaVA runs them; a setting's `stages` maps some of them
# to the default that command starts from.
STAGES = ("pretrain", "finetune", "lora", "dpo")

# Help panels, in the order `--help` lists them.
MODEL = "Model"
TRAINABLE = "What trains"
LORA = "LoRA and quantization"
DATA = "Data"
EVALUATION = "Evaluation"
OPTIMISATION = "Optimisation"
SPEED = "Speed and memory"
PREFERENCE = "Preference (dpo)"
OUTPUT = "Output and checkpoints"
PANELS = (MODEL, TRAINABLE, LORA, DATA, EVALUATION, OPTIMISATION, SPEED, PREFERENCE, OUTPUT)


@dataclass(frozen=True)
class Setting:
    """A setting's declaration beside its type and default.

    - `help`: one sentence for `--help` and the settings reference.
    - `panel`: the `--help` panel.
    - `aliases`: extra command-line names (`--lr`); `--name-with-dashes` is always one.
    - `flag`: False for a key set by recipe or `--set` only (no option of its own).
    - `stages`: the default per training command, where it differs from the field default.
    - `commands`: the commands that offer it (default: every training command).
    - `default_text`: how `--help` words a default of None ("the model's").
    """

    help: str
    panel: str
    aliases: tuple[str, ...] = ()
    flag: bool = True
    stages: Mapping[str, Any] = field(default_factory=dict)
    commands: tuple[str, ...] = STAGES
    default_text: str | None = None

    def default_for(self, stage: str, default: Any) -> Any:
        """The default `stage` starts from (`default`: the field's own)."""
        return self.stages.get(stage, default)
