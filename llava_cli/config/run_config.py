"""The one typed run configuration, validated once (pydantic, frozen, unknown keys refused)
and saved resolved next to every output.

`config.resolve` builds it from presets, recipes, `--set` and flags; any
`transformers.TrainingArguments` field is kept in `training_args`, which `train.arguments` alone
turns into the Trainer's arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava_cli.artifacts.files import write_text_atomically
from llava_cli.artifacts.manifest import OutputKind
from llava_cli.config.deepspeed import refuse_incompatible_deepspeed
from llava_cli.config.training_checks import (
    refuse_impossible_counts,
    refuse_preference_conflicts,
    refuse_uncacheable_tower,
)
from llava_cli.data.samples import DataOptions, ImageCheck
from llava_cli.data.text.templates import CHAT_TEMPLATE, canonical_template_name

Trainability = Literal["frozen", "full", "lora"]
_LAST_LAYERS = re.compile(r"last_(\d+)_layers")
TOWER_PARTS_HELP = ("frozen, full, or vision-tower parts joined by + (position_embedding, "
                    "last_N_layers), e.g. position_embedding+last_2_layers")


def tower_parts(spec: str) -> tuple[bool, int]:
    """A vision-tower parts declaration → (train the position embedding, last N layers).
    `model.parts.tower_parameters` turns it into parameters."""
    position, last = False, 0
    for part in spec.split("+"):
        match = _LAST_LAYERS.fullmatch(part.strip())
        if part.strip() == "position_embedding" and not position:
            position = True
        elif match and int(match.group(1)) > 0 and not last:
            last = int(match.group(1))
        else:
            raise ValueError(f"train_vision_tower {spec!r}: {part.strip()!r} is not a tower "
                             f"part; give {TOWER_PARTS_HELP}")
    return position, last
CONFIG_FILENAME = "llava_config.yaml"


# Attention implementations that turn packed position ids into per-sample attention.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


# Where `packing: auto` packs: the attention implementations with which cross-sample packing
# was measured faster than padded batches (bench/RESULTS.md, "Packing"). Measured on CPU only
# so far; a GPU's flash-attention (varlen, no masked work) is measured by bench/gpu_smoke.py.
PACKING_MEASURED_FASTER: frozenset[str] = frozenset()


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (which key, what to do)."""


class RunConfig(BaseModel):
    """Everything a run depends on. Field names follow LLaVA's where one exists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Model parts
    model_name_or_path: str | None = None
    vision_tower: str | None = None
    tokenizer: str | None = None  # defaults to the model's
    projector_type: str = "mlp2x_gelu"
    vision_select_layer: int = -2
    vision_select_feature: Literal["patch", "cls_patch"] = "patch"
    pretrained_projector: str | None = None
    random_init: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    torch_dtype: str | None = None
    # Trainability per component, applied in one place
    # the tower may also train parts of itself only: `tower_parts` reads the declaration
    train_vision_tower: str = "frozen"
    train_projector: Trainability = "full"
    train_llm: Trainability = "full"
    # None: as the LLM. LLaVA's freeze_backbone freezes the decoder, keeping lm_head trained.
    train_lm_head: Literal["frozen", "full"] | None = None
    projector_lr: float | None = None
    vision_tower_lr: float | None = None
    # LoRA / quantization
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    # Which linear layers of the LLM get adapters: all (as the original LLaVA), or these kinds
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bits: Literal[4, 8, 16] = 16
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # Data
    data_path: str | None = None
    image_folder: str | None = None
    eval_data_path: str | None = None  # held-out records: eval_loss when checkpointing
    eval_image_folder: str | None = None  # default: image_folder
    eval_generate: str | None = None  # a QA file: eval_accuracy at each evaluation
    eval_generate_image_folder: str | None = None  # default: the QA file's folder
    eval_generate_max_new_tokens: int = Field(default=64, ge=1)
    template: str = "v1"
    # LLaVA's: each image written <im_start><image><im_end>, the two tokens added and trained
    mm_use_im_start_end: bool = False
    tokenization: Literal["hf", "llava"] = "hf"
    image_aspect_ratio: Literal["square", "pad", "anyres"] = "pad"
    image_grid_pinpoints: list[list[int]] | None = None
    model_max_length: int = 2048
    skip_bad_records: bool = False
    # What the data checks (pre-training, held-out, inspect-data --check) read of each image:
    # fast = header, Pillow's pixel limit and the file's end; full = decode every file.
    image_check: ImageCheck = "fast"
    allow_images_outside_folder: bool = False  # image paths may leave image_folder (../, /abs)
    group_by_modality_length: bool = False
    # Speed levers, each switchable alone (bench/bench_levers.py measures them)
    supervised_logits_only: bool = True  # LM head + loss only where labels are supervised
    skip_frozen_backward: bool = True  # a frozen vision tower runs forward only
    padding_free: bool = False  # pack each batch into one row (no padding at all)
    # Cross-sample packing to a token budget (data.batching.packing); auto: where measured
    # faster (`packing_choice`). padded: the same packs as padded rows (the unpacked compute)
    packing: Literal["auto", "on", "off"] = "auto"
    packing_budget: int | None = None  # tokens per packed row; default model_max_length
    packing_layout: Literal["packed", "padded"] = "packed"
    vision_feature_cache: str | None = None  # a directory: the frozen tower's outputs, reused
    # Preference training (`llava dpo`), with TRL's names; reference: the starting model as a
    # frozen copy, or the trained model with its LoRA adapters off (auto: that, under LoRA)
    objective: Literal["sft", "dpo"] = "sft"
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    rpo_alpha: float | None = None  # + alpha x the chosen replies' NLL
    reference: Literal["auto", "copy", "disabled-adapter"] = "auto"
    precompute_ref_log_probs: bool = False
    # Kept as the user wrote it; transformers 5 folded it into warmup_steps (train.arguments)
    warmup_ratio: float | None = None
    # Output
    output_dir: str | None = None
    overwrite: bool = False
    resume: str | None = None
    # Any other transformers.TrainingArguments field (learning_rate, num_train_epochs, …)
    training_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        return canonical_template_name(value)

    @field_validator("train_vision_tower")
    @classmethod
    def _tower_declaration(cls, value: str) -> str:
        if value not in ("frozen", "full", "lora"):
            tower_parts(value)  # the error names what a declaration may hold
        return value

    @field_validator("warmup_ratio")
    @classmethod
    def _a_ratio(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < 1:
            raise ValueError("must be at least 0 and below 1 (a share of the training steps); "
                             "give warmup_steps for a number of steps")
        return value

    @field_validator("model_max_length")
    @classmethod
    def _positive_length(cls, value: int) -> int:
        if value < 8:
            raise ValueError("must be at least 8 tokens")
        return value

    @model_validator(mode="after")
    def _compatible(self) -> RunConfig:
        if self.bits != 16 and self.train_llm != "lora":
            raise ValueError(f"bits {self.bits} quantizes the LLM, which then cannot be trained "
                             "fully: add --lora (QLoRA) or drop --bits")
        if self.padding_free and self.attn_implementation not in PACKING_ATTENTION:
            raise ValueError(f"padding_free needs an attention that honours per-sample position "
                             f"ids ({', '.join(PACKING_ATTENTION)}); attn_implementation is "
                             f"{self.attn_implementation!r}")
        if self.packing == "on" and self.attn_implementation not in PACKING_ATTENTION:
            raise ValueError(f"packing needs an attention that honours per-sample position "
                             f"ids ({', '.join(PACKING_ATTENTION)}); attn_implementation is "
                             f"{self.attn_implementation!r}")
        if self.packing_budget is not None and self.packing_budget < 8:
            raise ValueError(f"packing_budget {self.packing_budget}: must be at least 8 tokens "
                             "(a row holds whole samples; default model_max_length)")
        if self.mm_use_im_start_end and self.template == CHAT_TEMPLATE:
            raise ValueError("mm_use_im_start_end: template 'chat-template' is the tokenizer's "
                             "own, which cannot write <im_start>/<im_end>; pick a named "
                             "template (e.g. --template v1)")
        refuse_incompatible_deepspeed(
            self.training_args.get("deepspeed"), self.bits,
            {"projector_lr": self.projector_lr, "vision_tower_lr": self.vision_tower_lr})
        refuse_impossible_counts(self.training_args)
        if self.objective == "dpo":
            refuse_preference_conflicts(self)
        if self.vision_feature_cache:
            refuse_uncacheable_tower(self.train_vision_tower, self.image_aspect_ratio,
                                     self.training_args.get("deepspeed"))
        return self

    @property
    def activation_checkpointing(self) -> bool:
        """Whether gradient (activation) checkpointing is on, under either of its names."""
        args = self.training_args
        return bool(args.get("activation_checkpointing", args.get("gradient_checkpointing")))

    @property
    def packing_choice(self) -> tuple[bool, str]:
        """Whether this run packs samples across the batch, and why (printed in the summary).
        `auto` packs where bench/bench_levers.py measured packing faster: see
        PACKING_MEASURED_FASTER."""
        if self.packing != "auto":
            return self.packing == "on", f"packing {self.packing}"
        faster = self.attn_implementation in PACKING_MEASURED_FASTER
        verdict = "measured faster" if faster else "not measured faster"
        return faster, f"auto: {verdict} with {self.attn_implementation} (bench/RESULTS.md)"

    @property
    def reference_kind(self) -> str:
        """Where `llava dpo`'s reference log-probs come from (see `reference`)."""
        if self.reference != "auto":
            return self.reference
        return "disabled-adapter" if self.train_llm == "lora" else "copy"

    @property
    def load_dtype(self) -> str | None:
        """The dtype weights load in: `torch_dtype` when given; else bfloat16 for a bf16 run
        without DeepSpeed (float32 weights would take twice the memory; the original LLaVA
        loads in the training dtype too — DeepSpeed keeps its own copies); else float32."""
        if self.torch_dtype:
            return self.torch_dtype
        if self.training_args.get("bf16") and not self.training_args.get("deepspeed"):
            return "bfloat16"
        return None

    @property
    def output_kind(self) -> OutputKind:
        """What the run writes, from trainability alone: a LoRA adapter, the projector alone
        (nothing else trains), or a full checkpoint."""
        if self.train_llm == "lora":
            return OutputKind.LORA
        if (self.train_llm, self.train_vision_tower, self.train_lm_head or "frozen") == (
                "frozen", "frozen", "frozen"):
            return OutputKind.PROJECTOR
        return OutputKind.FULL

    def data_options(self, held_out: bool = False) -> DataOptions:
        """The data settings of the training records (or, `held_out`, the evaluation ones)."""
        folder = (self.eval_image_folder or self.image_folder) if held_out else self.image_folder
        return DataOptions(self.template, self.tokenization, folder, self.image_aspect_ratio,
                           self.model_max_length, image_check=self.image_check,
                           allow_images_outside_folder=self.allow_images_outside_folder,
                           mm_use_im_start_end=self.mm_use_im_start_end)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (what `--print-config` shows and runs save)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


PATH_KEYS = ("model_name_or_path", "vision_tower", "tokenizer", "pretrained_projector",
             "data_path", "image_folder", "eval_data_path", "eval_image_folder", "eval_generate",
             "eval_generate_image_folder", "output_dir", "resume", "vision_feature_cache")


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The same configuration with every existing local path made absolute (hub ids and
    names that are not paths stay), so a saved config works from any directory."""
    def absolute(value: Any) -> Any:
        return str(Path(value).resolve()) if isinstance(value, str) and value \
            and Path(value).exists() else value

    update: dict[str, Any] = {key: absolute(getattr(config, key)) for key in PATH_KEYS}
    if "deepspeed" in config.training_args:
        update["training_args"] = {**config.training_args,
                                   "deepspeed": absolute(config.training_args["deepspeed"])}
    return config.model_copy(update=update)


def save_resolved(config: RunConfig, directory: str | Path) -> Path:
    """Write the resolved configuration into `directory` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(directory / CONFIG_FILENAME, config.to_yaml())
