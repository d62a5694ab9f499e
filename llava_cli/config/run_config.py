"""The one typed run configuration, validated once (pydantic, frozen, unknown keys refused)
and saved resolved next to every output.

`config.resolve` builds it from presets, recipes, `--set` and flags; any
`transformers.TrainingArguments` field is kept in `training_args`, which `train.arguments` alone
turns into the Trainer's arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llava_cli.artifacts.files import write_text_atomically
from llava_cli.config.deepspeed import refuse_incompatible_deepspeed
from llava_cli.config.setting import (
    DATA,
    EVALUATION,
    LORA,
    MODEL,
    OPTIMISATION,
    OUTPUT,
    PREFERENCE,
    SPEED,
    TRAINABLE,
    Setting,
)
from llava_cli.config.training_checks import (
    refuse_impossible_counts,
    refuse_preference_conflicts,
    refuse_uncacheable_tower,
)
from llava_cli.data.problems import ImageCheck

if TYPE_CHECKING:
    from llava_cli.artifacts.manifest import OutputKind
    from llava_cli.data.samples import DataOptions
from llava_cli.data.text.templates import CHAT_TEMPLATE, TEMPLATE_NAMES, canonical_template_name

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

    # Model
    model_name_or_path: Annotated[str | None, Setting(
        "The starting model: an LLM (a new LLaVA is built around it), a LLaVA checkpoint, a "
        "pretrain output, or an original LLaVA checkpoint.", MODEL,
        default_text="none: required")] = None
    vision_tower: Annotated[str | None, Setting(
        "The vision tower (CLIP or SigLIP) of a new model.", MODEL,
        default_text="none: required for a new model")] = None
    tokenizer: Annotated[str | None, Setting(
        "Tokenizer folder or hub id.", MODEL, default_text="the model's")] = None
    projector_type: Annotated[str, Setting(
        "Projector of a new model: mlp2x_gelu (LLaVA-1.5) or linear (LLaVA-1); a checkpoint "
        "keeps its own.", MODEL)] = "mlp2x_gelu"
    vision_select_layer: Annotated[int, Setting(
        "Vision-tower layer whose features feed the projector (a checkpoint keeps its own).",
        MODEL)] = -2
    vision_select_feature: Annotated[Literal["patch", "cls_patch"], Setting(
        "Patch features only, or with the CLS position (a checkpoint keeps its own).",
        MODEL)] = "patch"
    pretrained_projector: Annotated[str | None, Setting(
        "Projector weights to start from: ours, or LLaVA's mm_projector.bin.", MODEL)] = None
    random_init: Annotated[bool, Setting(
        "Build the LLM and vision tower from their configs without weights (demo, tests).",
        MODEL)] = False
    trust_remote_code: Annotated[bool, Setting(
        "Let transformers run code shipped with the model (only models you trust).",
        MODEL)] = False
    attn_implementation: Annotated[str, Setting(
        "Attention: sdpa, eager, flash_attention_2, flash_attention_3 or flex_attention.",
        MODEL)] = "sdpa"
    torch_dtype: Annotated[str | None, Setting(
        "Dtype the weights load in (float32, bfloat16, float16).", MODEL,
        default_text="bfloat16 with --bf16 and no DeepSpeed, else float32")] = None
    # What trains: each component declared once, applied in one place (`model.parts`)
    train_vision_tower: Annotated[str, Setting(
        "Vision tower: frozen, full, or parts joined by + (position_embedding, "
        "last_N_layers).", TRAINABLE)] = "frozen"
    train_projector: Annotated[Trainability, Setting(
        "Projector: frozen, full or lora.", TRAINABLE, stages={"dpo": "frozen"})] = "full"
    train_llm: Annotated[Trainability, Setting(
        "LLM: frozen, full or lora.", TRAINABLE,
        stages={"pretrain": "frozen", "lora": "lora"})] = "full"
    train_lm_head: Annotated[Literal["frozen", "full"] | None, Setting(
        "LM head: frozen or full (LLaVA's freeze_backbone trains it alone).", TRAINABLE,
        default_text="as the LLM")] = None
    projector_lr: Annotated[float | None, Setting(
        "Learning rate of the projector.", TRAINABLE, stages={"lora": 2e-5},
        default_text="the learning rate")] = None
    vision_tower_lr: Annotated[float | None, Setting(
        "Learning rate of the vision tower.", TRAINABLE,
        default_text="the learning rate")] = None
    # LoRA / quantization
    lora_r: Annotated[int, Setting("LoRA rank.", LORA, stages={"lora": 128})] = 64
    lora_alpha: Annotated[int, Setting(
        "LoRA alpha (the update is scaled by alpha / r).", LORA, stages={"lora": 256})] = 16
    lora_dropout: Annotated[float, Setting("Dropout on the LoRA inputs.", LORA)] = 0.05
    lora_bias: Annotated[Literal["none", "all", "lora_only"], Setting(
        "Which biases train with LoRA.", LORA)] = "none"
    lora_target_modules: Annotated[list[str] | Literal["all-linear"], Setting(
        "The LLM's linear layers that get adapters: all-linear (as LLaVA), or a list of "
        "names.", LORA, flag=False)] = "all-linear"
    bits: Annotated[Literal[4, 8, 16], Setting(
        "4 or 8: quantize the LLM and train LoRA on it (QLoRA); 16: no quantization.",
        LORA)] = 16
    quant_type: Annotated[Literal["nf4", "fp4"], Setting(
        "4-bit data type.", LORA)] = "nf4"
    double_quant: Annotated[bool, Setting(
        "Quantize the 4-bit quantization constants too.", LORA)] = True
    # Data
    data_path: Annotated[str | None, Setting(
        "Training records: LLaVA .json/.jsonl, or a mix file (docs/data.md).", DATA,
        default_text="none: required")] = None
    image_folder: Annotated[str | None, Setting(
        "Where the records' relative image paths point.", DATA,
        default_text="the data file's folder")] = None
    template: Annotated[str, Setting(
        "Conversation template: " + ", ".join(TEMPLATE_NAMES) + ".", DATA,
        stages={"pretrain": "plain"})] = "v1"
    mm_use_im_start_end: Annotated[bool, Setting(
        "Write each image as <im_start><image><im_end> (LLaVA's option; both tokens "
        "train).", DATA)] = False
    tokenization: Annotated[Literal["hf", "llava"], Setting(
        "hf: the tokenizer as it is; llava: the original code's ids, turn by turn.",
        DATA)] = "hf"
    image_aspect_ratio: Annotated[Literal["square", "pad", "anyres"], Setting(
        "Image policy: square (resize), pad (to a square of the mean colour, LLaVA-1.5), "
        "anyres (LLaVA-NeXT tiles).", DATA, stages={"pretrain": "square"})] = "pad"
    image_grid_pinpoints: Annotated[list[list[int]] | None, Setting(
        "anyres: the tile grid resolutions, e.g. [[336, 672], [672, 336]].", DATA,
        flag=False, default_text="LLaVA-NeXT's")] = None
    model_max_length: Annotated[int, Setting(
        "Longest sample in tokens (image tokens included); longer ones are cut.",
        DATA)] = 2048
    skip_bad_records: Annotated[bool, Setting(
        "Skip and count records that cannot be read instead of stopping.", DATA)] = False
    image_check: Annotated[ImageCheck, Setting(
        "What the data checks read of each image: fast (header and end) or full "
        "(decode).", DATA)] = "fast"
    allow_images_outside_folder: Annotated[bool, Setting(
        "Let image paths leave the image folder (../, absolute paths).", DATA)] = False
    group_by_modality_length: Annotated[bool, Setting(
        "Batches of one modality (image or text) and similar length.", DATA)] = False
    # Evaluation
    eval_data_path: Annotated[str | None, Setting(
        "Held-out records: eval_loss at every save.", EVALUATION)] = None
    eval_image_folder: Annotated[str | None, Setting(
        "Images of the held-out records.", EVALUATION,
        default_text="--image-folder")] = None
    eval_generate: Annotated[str | None, Setting(
        "A QA file (as llava evaluate reads) answered at each evaluation: eval_accuracy "
        "beside eval_loss.", EVALUATION)] = None
    eval_generate_image_folder: Annotated[str | None, Setting(
        "Images of the --eval-generate QA file.", EVALUATION, flag=False,
        default_text="the QA file's folder")] = None
    eval_generate_max_new_tokens: Annotated[int, Setting(
        "Most tokens of each --eval-generate answer.", EVALUATION, flag=False)] = 64
    # Speed levers, each switchable alone (bench/bench_levers.py measures them)
    supervised_logits_only: Annotated[bool, Setting(
        "LM head and loss only where labels are supervised (same loss, less memory).",
        SPEED)] = True
    skip_frozen_backward: Annotated[bool, Setting(
        "A frozen vision tower runs forward only.", SPEED)] = True
    padding_free: Annotated[bool, Setting(
        "Pack each batch into one row (no padding at all).", SPEED)] = False
    packing: Annotated[Literal["auto", "on", "off"], Setting(
        "Pack samples across the batch into rows of --packing-budget tokens; auto: where "
        "measured faster (bench/RESULTS.md).", SPEED)] = "auto"
    packing_budget: Annotated[int | None, Setting(
        "Tokens per packed row.", SPEED, default_text="--model-max-length")] = None
    packing_layout: Annotated[Literal["packed", "padded"], Setting(
        "padded: the same packs as padded rows (the unpacked compute, for comparison).",
        SPEED, flag=False)] = "packed"
    vision_feature_cache: Annotated[str | None, Setting(
        "A folder caching the frozen vision tower's outputs, reused across epochs and runs "
        "(safe to delete).", SPEED)] = None
    # Preference training (`llava dpo`), with TRL's names; reference: the starting model as a
    # frozen copy, or the trained model with its LoRA adapters off (auto: that, under LoRA)
    objective: Annotated[Literal["sft", "dpo"], Setting(
        "The training objective (set by the command).", PREFERENCE, flag=False,
        stages={"dpo": "dpo"})] = "sft"
    beta: Annotated[float, Setting(
        "KL strength of DPO/IPO.", PREFERENCE, commands=("dpo",))] = 0.1
    loss_type: Annotated[Literal["sigmoid", "ipo"], Setting(
        "sigmoid (DPO) or ipo.", PREFERENCE, commands=("dpo",))] = "sigmoid"
    rpo_alpha: Annotated[float | None, Setting(
        "Add alpha x the chosen replies' NLL (RPO).", PREFERENCE, commands=("dpo",),
        default_text="off")] = None
    reference: Annotated[Literal["auto", "copy", "disabled-adapter"], Setting(
        "The reference policy; auto: disabled-adapter with LoRA, else a frozen copy.",
        PREFERENCE, commands=("dpo",))] = "auto"
    precompute_ref_log_probs: Annotated[bool, Setting(
        "Reference log-probs in one pass before training (a copy is then freed).",
        PREFERENCE, commands=("dpo",))] = False
    # Kept as the user wrote it; transformers 5 folded it into warmup_steps (train.arguments)
    warmup_ratio: Annotated[float | None, Setting(
        "Share of the steps spent warming the learning rate up.", OPTIMISATION,
        stages={"pretrain": 0.03, "finetune": 0.03, "lora": 0.03, "dpo": 0.1},
        default_text="none")] = None
    # Output
    output_dir: Annotated[str | None, Setting(
        "Where the run writes its output (published complete, manifest last).", OUTPUT,
        aliases=("-o",), default_text="none: required")] = None
    overwrite: Annotated[bool, Setting(
        "Allow writing into a non-empty output directory.", OUTPUT)] = False
    resume: Annotated[str | None, Setting(
        "Continue from a checkpoint folder, or 'latest' in the output directory.",
        OUTPUT)] = None
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
        from llava_cli.artifacts.manifest import OutputKind

        if self.train_llm == "lora":
            return OutputKind.LORA
        if (self.train_llm, self.train_vision_tower, self.train_lm_head or "frozen") == (
                "frozen", "frozen", "frozen"):
            return OutputKind.PROJECTOR
        return OutputKind.FULL

    def data_options(self, held_out: bool = False) -> DataOptions:
        """The data settings of the training records (or, `held_out`, the evaluation ones)."""
        from llava_cli.data.samples import DataOptions

        folder = (self.eval_image_folder or self.image_folder) if held_out else self.image_folder
        return DataOptions(self.template, self.tokenization, folder, self.image_aspect_ratio,
                           self.model_max_length, image_check=self.image_check,
                           allow_images_outside_folder=self.allow_images_outside_folder,
                           mm_use_im_start_end=self.mm_use_im_start_end)

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (what `--print-config` shows and runs save)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# The transformers.TrainingArguments fields with an option of their own, and the ones whose
# default differs from transformers' (type and default otherwise transformers' own,
# `config.trainer_fields`). Any other field is reachable through a recipe or `--set`.
# Stage values are LLaVA-1.5's scripts/v1_5/{pretrain,finetune,finetune_lora}.sh (global
# batch 256 / 128 on 8 GPUs: with fewer, raise gradient_accumulation_steps) and LLaVA-NeXT's
# scripts/train/dpo.sh.
TRAINER_SETTINGS: dict[str, tuple[Setting, Any]] = {  # name: (declaration, our default)
    "learning_rate": (Setting(
        "Peak learning rate.", OPTIMISATION, aliases=("--lr",),
        stages={"pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4, "dpo": 5e-7}), None),
    "num_train_epochs": (Setting(
        "Passes over the data (fractions allowed).", OPTIMISATION, aliases=("--epochs",),
        stages={"pretrain": 1.0, "finetune": 1.0, "lora": 1.0, "dpo": 3.0}), None),
    "max_steps": (Setting(
        "Stop after this many optimizer steps (-1: run the epochs).", OPTIMISATION), None),
    "per_device_train_batch_size": (Setting(
        "Samples (or packed rows) per process and step.", OPTIMISATION,
        aliases=("--batch-size",),
        stages={"pretrain": 32, "finetune": 16, "lora": 16, "dpo": 1}), None),
    "gradient_accumulation_steps": (Setting(
        "Batches per optimizer step.", OPTIMISATION, stages={"dpo": 16}), None),
    "lr_scheduler_type": (Setting(
        "Learning-rate schedule.", OPTIMISATION,
        stages={"pretrain": "cosine", "finetune": "cosine", "lora": "cosine",
                "dpo": "linear"}), None),
    "weight_decay": (Setting(
        "AdamW weight decay.", OPTIMISATION,
        stages={"pretrain": 0.0, "finetune": 0.0, "lora": 0.0, "dpo": 0.0}), None),
    "seed": (Setting("Seed of the run (data order, initialisation).", OPTIMISATION), None),
    "gradient_checkpointing": (Setting(
        "Recompute activations in the backward pass (less memory, more time).", SPEED), False),
    "bf16": (Setting("bfloat16 mixed precision.", SPEED), None),
    "fp16": (Setting("float16 mixed precision (GPU only).", SPEED), None),
    "dataloader_num_workers": (Setting(
        "Dataloader worker processes per training process.", SPEED,
        default_text="half the cores per process, at most 4"), None),
    "deepspeed": (Setting(
        "DeepSpeed JSON config (recipes/deepspeed/zero2.json, zero3.json).", SPEED), None),
    "save_steps": (Setting("Save a checkpoint every N steps.", OUTPUT), 500),
    "save_total_limit": (Setting("Checkpoints kept (the oldest are deleted).", OUTPUT), 2),
    "logging_steps": (Setting("Log every N steps.", OUTPUT), 1),
    "report_to": (Setting(
        "Where metrics go: none, tensorboard, wandb or another integration (nowhere unless "
        "asked).", OUTPUT), "none"),
    "save_strategy": (Setting("When checkpoints are saved.", OUTPUT, flag=False), "steps"),
    "disable_tqdm": (Setting(
        "Hide transformers' progress bar (ours replaces it).", OUTPUT, flag=False), True),
}


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
