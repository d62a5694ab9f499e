"""`llava convert CHECKPOINT -o OUT`: an original-layout LLaVA → our HF-native output.

A full checkpoint or a LoRA run (merged into `--base`, as the original's loader does) becomes
a full output: stock-transformers weights, processor (the tower's image settings, `pad` as
LlavaImageProcessor do_pad), chat template, generation config, manifest. A projector-only
run becomes what `pretrain` writes (projector.safetensors on the base LLM + tower), so
`finetune` starts from it. The order of work, with one model in memory at a time: build →
save into a staging folder → free → the original's logits from the original files (read
under the original's key names: `convert.original_forward`) → reload the staging folder with stock
transformers → compare → publish, manifest last. Nothing is published that failed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import (
    MANIFEST_NAME,
    OriginalBase,
    OutputKind,
    PartsBase,
    RunManifest,
    base_fingerprint,
)
from llava_cli.artifacts.original_layout import OriginalCheckpoint, require_original
from llava_cli.artifacts.output_dir import (
    STALE_RUN_OUTPUTS,
    drop_custom_code,
    publishing,
)
from llava_cli.artifacts.projector_file import PROJECTOR_FILE, PROJECTOR_PREFIX
from llava_cli.convert.original_forward import (
    checked_logits,
    expand_ids,
    original_logits,
    probe_ids,
)
from llava_cli.merge.verify import PROBE_QUESTION, Check, probe_image
from llava_cli.model.original import base_of, tower_of


@dataclass
class ConvertResult:
    """What `convert_original` wrote and how it was checked."""

    output_dir: Path
    source: OriginalCheckpoint
    kind: OutputKind
    checks: list[Check] = field(default_factory=list)


def convert_original(source: str | Path, output_dir: str | Path,
                     vision_tower: str | None = None, base: str | None = None,
                     template: str = "v1", overwrite: bool = False, verify: bool = True,
                     log: Callable[[str], None] = lambda _: None) -> ConvertResult:
    """Convert the original-layout checkpoint `source` into `output_dir` (see the module
    docstring). Raises ValueError for bad inputs, ConversionError for a failed check."""
    from llava_cli.data.text.templates import canonical_template_name

    template = canonical_template_name(template)
    original = require_original(source)
    tower, llm = tower_of(original, vision_tower), base_of(original, base)
    out = Path(output_dir)
    kind = OutputKind.PROJECTOR if original.kind == "projector" else OutputKind.FULL
    result = ConvertResult(out, original, kind)
    inputs = {"checkpoint": str(original.folder), "vision tower": tower, "base LLM": llm}
    with publishing(out, STALE_RUN_OUTPUTS, inputs=inputs, overwrite=overwrite) as staging:
        if kind == OutputKind.PROJECTOR:
            _write_projector_run(original, tower, llm, template, staging)
        else:
            result.checks = _write_full(original, tower, llm, template, verify, staging, log)
        drop_custom_code(staging)  # stock classes: no custom code the input referred to
    return result


def _write_full(original: OriginalCheckpoint, tower: str, llm: str | None, template: str,
                verify: bool, staging: Path, log: Callable[[str], None]) -> list[Check]:
    from llava_cli.model.original import build_from_original

    converted = build_from_original(original, tower, llm, template)
    processor = converted.processor
    converted.model.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))
    count = converted.model.config.image_seq_length
    image_token_id = converted.model.config.image_token_id
    _manifest(original, converted.base, OutputKind.FULL, template,
              converted.image_aspect_ratio, staging)
    del converted
    gc.collect()
    if not verify:
        return []
    ids = probe_ids(processor.tokenizer, PROBE_QUESTION)
    pixels = processor.image_processor(probe_image(), return_tensors="pt")["pixel_values"]
    reference = original_logits(original, tower, llm, ids, pixels)
    logits = reloaded_logits(staging, expand_ids(ids, image_token_id, count), pixels)
    return [checked_logits(f"the original {original.kind} checkpoint, read in its own layout",
                           logits, reference, log, "converted model failed verification")]


def reloaded_logits(folder: Path, ids: list[int], pixels: Any) -> Any:
    """Float32 logits of the model saved in `folder`, reloaded strictly with stock
    transformers (what a user's `from_pretrained` gets), on `ids` and `pixels`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from llava_cli.model.load import LLAVA_MODEL, load_pretrained

    model = load_pretrained(AutoModelForImageTextToText, str(folder), LLAVA_MODEL).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()
    del model
    gc.collect()
    return logits


def _write_projector_run(original: OriginalCheckpoint, tower: str, llm: str | None,
                         template: str, staging: Path) -> None:
    """What `pretrain` writes: the projector (stock key names), the tokenizer, a manifest on
    the base LLM + tower (so `finetune --model-name-or-path OUT` composes the same model)."""
    from llava_cli.artifacts.original_layout import MM_PROJECTOR_FILE
    from llava_cli.artifacts.projector_file import read_projector_file, write_projector_file
    from llava_cli.model.original import build_from_original

    # Built once, in full, so the tower, projector and LLM are proved to fit together.
    converted = build_from_original(original, tower, llm, template)
    converted.processor.save_pretrained(str(staging))
    del converted
    gc.collect()
    state = read_projector_file(original.folder / MM_PROJECTOR_FILE)
    write_projector_file({PROJECTOR_PREFIX + k: v.contiguous() for k, v in state.items()},
                         staging / PROJECTOR_FILE)
    parts = PartsBase(llm=str(llm), vision_tower=tower,
                      vision_select_layer=original.config.get("mm_vision_select_layer", -2),
                      vision_select_feature=original.config.get("mm_vision_select_feature",
                                                                "patch"))
    parts = parts.model_copy(update={"fingerprint": base_fingerprint(parts)})
    aspect = original.config.get("image_aspect_ratio", "square")
    _manifest(original, parts, OutputKind.PROJECTOR, template, aspect, staging)


def _manifest(original: OriginalCheckpoint, base: Any, kind: OutputKind, template: str,
              aspect: str, staging: Path) -> None:
    if isinstance(base, OriginalBase):
        base = base.model_copy(update={"fingerprint": base_fingerprint(base)})
    files = sorted({p.name for p in staging.iterdir()} | {MANIFEST_NAME})
    # "llava": the original tokenizes each side of <image> apart (tokenizer_image_token).
    RunManifest(kind=kind, base=base, template=template, tokenization="llava",
                image_aspect_ratio=aspect, files=files,
                extra={"converted_from": {"path": str(original.folder.resolve()),
                                          "layout": "original LLaVA", "kind": original.kind}}
                ).write(staging)


def describe(result: ConvertResult) -> str:
    """A one-line summary for the command."""
    checked = "verified against the original's logits" if result.checks else "not verified"
    if result.kind == OutputKind.PROJECTOR:
        checked = "a pretrain output: finetune --model-name-or-path starts from it"
    return (f"original {result.source.kind} checkpoint converted to a {result.kind} output in "
            f"{result.output_dir} ({checked})")
