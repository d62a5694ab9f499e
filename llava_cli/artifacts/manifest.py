"""The run manifest (`llava_run.json`): what kind of output a directory holds and its base.

Merge, export, generate and `finetune --model-name-or-path RUN_DIR` read it; nothing is ever
decided from a directory's name (LLaVA's "the folder name must contain 'llava'" trap).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava_cli.artifacts.files import write_text_atomically

MANIFEST_NAME = "llava_run.json"
FORMAT_VERSION = 1


class OutputKind(str, Enum):
    """What a run directory holds; decided by trainability alone (`RunConfig.output_kind`)."""

    PROJECTOR = "projector"  # projector.safetensors only: the LLM and vision tower were frozen
    FULL = "full"  # a complete HF checkpoint
    LORA = "lora"  # a PEFT adapter (with the projector when it was trained)

    def __str__(self) -> str:
        return self.value


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PartsBase(_Base):
    """A new model composed at training time from an LLM and a vision tower."""

    type: Literal["parts"] = "parts"
    llm: str
    vision_tower: str
    vision_select_layer: int = -2
    vision_select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    random_init: bool = False
    pretrained_projector: str | None = None  # a projector file loaded on top
    fingerprint: str | None = None  # of the weight files it was built from (`base_fingerprint`)


class CheckpointBase(_Base):
    """An HF-layout LLaVA checkpoint (ours or llava-hf); `path` may be relative to the run
    (a random-init pretrain run keeps its base weights in its own `base/`)."""

    type: Literal["llava"] = "llava"
    path: str
    random_init: bool = False
    pretrained_projector: str | None = None
    started_from: str | None = None  # the model a relative `path` was reached from
    fingerprint: str | None = None  # of its weight files and projector file (`base_fingerprint`)


class OriginalBase(_Base):
    """A checkpoint in the original LLaVA's layout (`llava convert`, or converted on the fly
    by a training run): the folder, its kind, and the vision tower / base LLM it was read
    with (absolute paths)."""

    type: Literal["original"] = "original"
    path: str
    kind: str  # full | projector | lora (`artifacts.original_layout.KINDS`)
    vision_tower: str
    llm: str | None = None  # the base LLM a projector or LoRA run was trained on
    pretrained_projector: str | None = None
    fingerprint: str | None = None  # of all three (`base_fingerprint`)


class MergedBase(_Base):
    """A LoRA adapter merged into its base (what `merge-lora` writes)."""

    type: Literal["merged"] = "merged"
    adapter: str
    base: Base


Base = Annotated[PartsBase | CheckpointBase | OriginalBase | MergedBase,
                 Field(discriminator="type")]
MergedBase.model_rebuild()


class RunManifest(BaseModel):
    """Describes one output directory: its kind, its base, and the data settings it was
    trained with (the generator and merge read them back)."""

    kind: OutputKind
    base: Base
    template: str
    tokenization: str
    image_aspect_ratio: str
    projector_type: str = "mlp2x_gelu"
    files: list[str] = Field(default_factory=list)
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def write(self, directory: str | Path) -> Path:
        """Write `llava_run.json` into `directory` atomically, stamping time and versions."""
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.versions = self.versions or package_versions()
        text = json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
        return write_text_atomically(Path(directory) / MANIFEST_NAME, text)


# What `weights_fingerprint` reads in a folder: every weight file transformers may load.
WEIGHT_SUFFIXES = (".safetensors", ".bin")
NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's pickled arguments, beside the weights


def base_fingerprint(base: Base) -> str | None:
    """The fingerprint of the weights `base` is built from: its checkpoint folder (or its LLM
    and vision tower folders) and the projector file loaded on top. None when there is
    nothing local to read: random-init parts, hub ids, a path relative to another run."""
    if isinstance(base, MergedBase):
        return None
    if isinstance(base, PartsBase):
        sources = [] if base.random_init else [base.llm, base.vision_tower]
    elif isinstance(base, OriginalBase):
        sources = [base.path, base.vision_tower] + ([base.llm] if base.llm else [])
    else:
        sources = [base.path] if Path(base.path).is_absolute() else []
    if sources and base.pretrained_projector:
        sources.append(base.pretrained_projector)
    return weights_fingerprint(sources)


def weights_fingerprint(sources: list[str]) -> str | None:
    """`sha256:…` over the whole content of every weight file of `sources` (folders, or
    single weight files), in order, each folder's files sorted by name. A source that is not
    on this machine (a hub id) counts by its name, so a local LLM beside a hub tower is still
    fingerprinted; None when nothing is local, or a local folder holds no weight files."""
    lines = []
    for index, source in enumerate(sources):
        if not Path(source).exists():
            lines.append(f"{index} not local: {source}")
            continue
        files = _weight_files(Path(source))
        if not files:
            return None
        for file in files:
            with file.open("rb") as handle:  # streamed: never the whole file in memory
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            lines.append(f"{index} {file.name} {digest}")
    if all(line.split(" ", 1)[1].startswith("not local: ") for line in lines):
        return None
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []  # a hub id, or gone
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and p.name not in NOT_WEIGHTS)


def read_manifest(directory: str | Path) -> RunManifest | None:
    """The manifest of `directory`, or None when it has none (e.g. a llava-hf checkpoint)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer llava_cli (format "
                         f"{data['format_version']}); upgrade llava_cli to read it")
    try:
        return RunManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{path} is not a valid llava_cli manifest ({where}: {first['msg']})"
                         ) from None


def package_versions() -> dict[str, str]:
    """Versions of the packages an output depends on (for reproducibility)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("llava-cli", "torch", "transformers", "peft", "accelerate", "bitsandbytes",
                 "deepspeed", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
