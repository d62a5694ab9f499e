"""The run manifest (`llava_run.json`): what kind of output a directory holds and its base.

Merge, export and `finetune --model-name-or-path RUN_DIR` read it; nothing is ever decided
from a directory's name (LLaVA's "the folder name must contain 'llava'" trap).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

MANIFEST_NAME = "llava_run.json"
OutputKind = Literal["projector", "full", "lora"]
FORMAT_VERSION = 1


@dataclass
class RunManifest:
    """Describes one output directory.

    `base` says how to rebuild the model the output applies to: `{"type": "parts", "llm":
    path, "vision_tower": path, ...}` or `{"type": "llava", "path": checkpoint}`.
    """

    kind: OutputKind
    base: dict[str, Any]
    template: str
    tokenization: str
    image_aspect_ratio: str
    projector_type: str = "mlp2x_gelu"
    files: list[str] = field(default_factory=list)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def write(self, directory: str | Path) -> Path:
        """Write `llava_run.json` into `directory` atomically, stamping time and versions."""
        self.created = self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.versions = self.versions or package_versions()
        target = Path(directory) / MANIFEST_NAME
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(temporary, target)
        return target


def read_manifest(directory: str | Path) -> RunManifest | None:
    """The manifest of `directory`, or None when it has none (e.g. a llava-hf checkpoint)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer llava_cli (format "
                         f"{data['format_version']}); upgrade llava_cli to read it")
    return RunManifest(**data)


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
