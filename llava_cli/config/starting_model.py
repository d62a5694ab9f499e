"""What a local starting model already fixes — its vision feature layer, feature selection and
projector — read from its files (JSON only, nothing loaded), so that `--print-config` and the
saved `llava_config.yaml` show the values the model really uses, not the defaults of a new
model. A hub id, or a plain LLM, fixes nothing: a new model gets the declared defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import PartsBase, read_manifest

FEATURE_KEYS = ("vision_select_layer", "vision_select_feature", "projector_type")


def own_feature_settings(model: str | None) -> dict[str, Any]:
    """The feature settings a local LLaVA checkpoint, pretrain output or original-layout
    checkpoint was built with ({} for anything else, or when its files cannot be read)."""
    folder = Path(model).expanduser() if model else None
    if folder is None or not folder.is_dir():
        return {}
    try:
        manifest = read_manifest(folder)
        if manifest is not None and isinstance(manifest.base, PartsBase):  # a pretrain output
            base = manifest.base
            return {"vision_select_layer": base.vision_select_layer,
                    "vision_select_feature": base.vision_select_feature,
                    "projector_type": base.projector_type}
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the model's loader names the problem
    if not isinstance(config, dict):
        return {}
    if "vision_feature_layer" in config:  # transformers' LLaVA (ours, llava-hf)
        layer = config["vision_feature_layer"]
        strategy = config.get("vision_feature_select_strategy", "default")
        return {"vision_select_layer": layer if isinstance(layer, int) else -2,
                "vision_select_feature": "cls_patch" if strategy == "full" else "patch",
                "projector_type": "mlp2x_gelu"}
    if "mm_vision_select_layer" in config:  # the original LLaVA layout (its projector is
        # checked where it is converted)
        return {"vision_select_layer": config["mm_vision_select_layer"],
                "vision_select_feature": config.get("mm_vision_select_feature", "patch")}
    return {}
