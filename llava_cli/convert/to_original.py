"""`llava convert RUN --to llava`: one of our outputs → the original LLaVA's layout, so that
its `load_pretrained_model` reads it and computes our logits.

A full output becomes `model.safetensors` under the original's names (`model.layers.*`,
`model.mm_projector.{0,2}.*`, the tower under `model.vision_tower.vision_tower.*`) with a
`llava_llama` config.json and the slow SentencePiece tokenizer files; a LoRA run becomes
`adapter_model.safetensors` (`base_model.model.model.layers.*`) + `non_lora_trainables.bin`
(the projector) + config.json, on the plain base LLM. The vision tower is written as a CLIP
folder `vision_tower/` beside them: the original loads its tower from the folder that
`mm_vision_tower` names, never from the checkpoint. The rows we added for `<image>` (and a
`<pad>` we added) are dropped: the original stands -200 in for images.

The original decides from the folder NAME what it loads: it must contain "llava" (and "lora"
for a LoRA run loaded with `--model-base`); we refuse an output name that breaks this rule.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.artifacts.files import (
    weight_file_named,
    write_atomically,
    write_text_atomically,
)
from llava_cli.artifacts.manifest import OutputKind, read_manifest
from llava_cli.artifacts.original_layout import (
    NON_LORA_FILE,
    adapter_key_to_original,
    find_original,
    from_ours,
    non_lora_of,
    to_original,
)
from llava_cli.artifacts.output_dir import (
    STALE_RUN_OUTPUTS,
    drop_custom_code,
    publishing,
)
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG, ADAPTER_FILE
from llava_cli.convert.original_files import (
    ADAPTER_DEFAULTS,
    TOWER_FOLDER,
    config_for_original,
    kept_rows,
    write_tokenizer_files,
    write_tower_folder,
)
from llava_cli.convert.original_forward import (
    ConversionError,
    checked_logits,
    expand_ids,
    original_logits,
    probe_ids,
)
from llava_cli.merge.verify import PROBE_QUESTION, Check, probe_image


@dataclass
class ToOriginalResult:
    """What `convert_to_original` wrote and how it was checked."""

    output_dir: Path
    kind: str  # full | lora
    mm_vision_tower: str
    model_base: str | None = None  # what the original's --model-base must be (LoRA)
    checks: list[Check] = field(default_factory=list)


def convert_to_original(run: str | Path, output_dir: str | Path, tower_name: str | None = None,
                        overwrite: bool = False, verify: bool = True,
                        log: Callable[[str], None] = lambda _: None) -> ToOriginalResult:
    """Write our full output or LoRA run `run` in the original's layout into `output_dir`."""
    source, out = Path(run), Path(output_dir)
    if find_original(source) is not None:
        raise ValueError(f"{source} is already in the original layout; --to llava takes one "
                         "of our outputs (convert it --to ours first, if anything)")
    manifest = read_manifest(source)
    if manifest is None and not (source / "config.json").is_file():
        raise ValueError(f"{source}: neither one of our outputs (no llava_run.json) nor an "
                         "HF-layout LLaVA checkpoint; point at a full or LoRA output")
    kind = "lora" if manifest is not None and manifest.kind == OutputKind.LORA else "full"
    if manifest is not None and manifest.kind == OutputKind.PROJECTOR:
        raise ValueError(f"{source} is a pretrain (projector) output: write its projector "
                         "with `llava export-projector RUN -o mm_projector.bin` instead")
    _refuse_name(out, kind)
    tower = tower_name or str((out / TOWER_FOLDER).resolve())
    result = ToOriginalResult(out, kind, tower)
    stale = (*STALE_RUN_OUTPUTS, NON_LORA_FILE, TOWER_FOLDER)
    with publishing(out, stale, inputs={"run": str(source)}, overwrite=overwrite) as staging:
        if kind == "full":
            result.checks = _full(source, manifest, staging, tower, out, verify, log)
        else:
            result.model_base, result.checks = _lora(source, staging, tower, out, verify, log)
        drop_custom_code(staging)  # the original's classes: no custom code of the input's
    return result


def _refuse_name(out: Path, kind: str) -> None:
    """The original's loader picks its code path by the folder name (builder.py)."""
    name = out.resolve().name.lower()
    needs = ["llava"] + (["lora"] if kind == "lora" else [])
    if any(word not in name for word in needs):
        raise ValueError(f"output directory name {out.name!r}: the original LLaVA loads a "
                         f"checkpoint as LLaVA only when its folder name contains "
                         f"{' and '.join(repr(w) for w in needs)}; name it e.g. "
                         f"{'llava-lora-' if kind == 'lora' else 'llava-'}{out.name}")


def _full(source: Path, manifest: Any, staging: Path, tower: str, out: Path, verify: bool,
          log: Callable[[str], None]) -> list[Check]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llava_cli.model.load import LLAVA_MODEL, load_pretrained

    model = load_pretrained(AutoModelForImageTextToText, str(source), LLAVA_MODEL).eval()
    processor = AutoProcessor.from_pretrained(str(source))
    rows = kept_rows(processor.tokenizer, model.config.text_config.vocab_size)
    parts = from_ours(model.state_dict())
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        parts.llm[key] = parts.llm[key][:rows]
    state = {k: v.contiguous() for k, v in to_original(parts).items()}
    _save_tensors(state, staging / "model.safetensors")
    aspect = manifest.image_aspect_ratio if manifest else _aspect(processor)
    config = config_for_original(model.config, rows, tower, aspect, "LlavaLlamaForCausalLM")
    write_text_atomically(staging / "config.json", json.dumps(config, indent=2) + "\n")
    write_tokenizer_files(source, staging)
    write_tower_folder(model.config.vision_config, parts.tower, processor, staging)
    if not verify:
        return []
    ids = probe_ids(processor.tokenizer, PROBE_QUESTION)
    pixels = processor.image_processor(probe_image(), return_tensors="pt")["pixel_values"]
    ours = _logits(model, expand_ids(ids, model.config.image_token_id,
                                     model.config.image_seq_length), pixels)
    del model, state, parts
    gc.collect()
    return _check(staging, out, None, ids, pixels, ours, log)


def _lora(source: Path, staging: Path, tower: str, out: Path, verify: bool,
          log: Callable[[str], None]) -> tuple[str, list[Check]]:
    from peft import PeftModel
    from safetensors.torch import load_file

    from llava_cli.artifacts.projector_file import read_adapter_projector
    from llava_cli.merge.lora_run import find_lora_run, load_base, load_processor

    run = find_lora_run(source)
    llm = _plain_llm(run)
    with weight_file_named(run.adapter / ADAPTER_FILE):
        adapter = load_file(str(run.adapter / ADAPTER_FILE))
    lora = {adapter_key_to_original(k): v.contiguous() for k, v in adapter.items()
            if ".lora_A." in k or ".lora_B." in k}
    others = [k for k in adapter if ".lora_" not in k and "multi_modal_projector" not in k]
    if others:  # e.g. a trained lm_head: non_lora_trainables here holds the projector only
        raise ValueError(f"{run.adapter / ADAPTER_FILE}: trained tensors besides LoRA and the "
                         f"projector ({others[:3]}) cannot be written in the original layout")
    _save_tensors(lora, staging / ADAPTER_FILE)
    projector = read_adapter_projector(run.adapter / ADAPTER_FILE)  # refuses a frozen one
    non_lora = {k: v.contiguous() for k, v in non_lora_of(projector).items()}
    write_atomically(staging / NON_LORA_FILE, lambda p: _torch_save(non_lora, p))
    ours = json.loads((run.adapter / ADAPTER_CONFIG).read_text())
    if ours.get("use_dora") or ours.get("lora_bias"):
        raise ValueError(f"{run.adapter / ADAPTER_CONFIG}: DoRA / LoRA bias adapters are not "
                         "plain LoRA; the original's PEFT cannot read them")
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in lora})
    # Only the keys the original's PEFT wrote: an older PEFT refuses keys it does not know.
    settings = {k: ours.get(k, v) for k, v in ADAPTER_DEFAULTS.items()}
    settings.update(base_model_name_or_path=llm, target_modules=targets, modules_to_save=None,
                    task_type="CAUSAL_LM", inference_mode=True)
    write_text_atomically(staging / ADAPTER_CONFIG, json.dumps(settings, indent=2) + "\n")
    base = load_base(run, None, "float32", 16)
    processor = load_processor(run)
    rows = kept_rows(processor.tokenizer, base.config.text_config.vocab_size)
    config = config_for_original(base.config, rows, tower, run.manifest.image_aspect_ratio,
                                 "LlamaForCausalLM")  # the original's LoRA config says so
    write_text_atomically(staging / "config.json", json.dumps(config, indent=2) + "\n")
    write_tower_folder(base.config.vision_config, from_ours(base.state_dict()).tower,
                       processor, staging)
    if not verify:
        return llm, []
    model = PeftModel.from_pretrained(base, str(run.adapter)).eval()
    ids = probe_ids(processor.tokenizer, PROBE_QUESTION)
    pixels = processor.image_processor(probe_image(), return_tensors="pt")["pixel_values"]
    ours = _logits(model, expand_ids(ids, base.config.image_token_id,
                                     base.config.image_seq_length), pixels)
    del model, base
    gc.collect()
    return llm, _check(staging, out, llm, ids, pixels, ours, log)


def _plain_llm(run: Any) -> str:
    """The plain LLM the original's `--model-base` must name: the run's base must be one
    composed from it (a pretrain output, or a converted original projector run)."""
    base = run.manifest.base
    llm = getattr(base, "llm", None)
    if not llm or getattr(base, "kind", "projector") != "projector":
        where = getattr(base, "path", None)
        named = f" {where}" if where else ""
        original = (f"`--model-base {where}`" if base.type == "original"
                    else "--model-base naming it in the original layout (`llava convert "
                    f"{where or 'BASE'} --to llava -o DIR` writes that)")
        raise ValueError(
            f"{run.root}: its base ({base.type}{named}) is a whole LLaVA checkpoint, not a "
            f"plain LLM; the original serves such a LoRA run with {original} (as "
            "finetune_task_lora.sh runs are served), a layout `convert --to llava` does not "
            f"write yet. Merge it (`llava merge-lora {run.root} -o MERGED`) and convert the "
            "merged output (`llava convert MERGED --to llava -o OUT`) instead")
    return llm


def _check(staging: Path, out: Path, llm: str | None, ids: list[int], pixels: Any, ours: Any,
           log: Callable[[str], None]) -> list[Check]:
    """The written files, read back under the original's names, must compute our logits."""
    written = find_original(staging)
    if written is None:
        raise ConversionError(f"{staging}: the files just written are not in the original layout")
    tower = str(staging / TOWER_FOLDER)  # where mm_vision_tower points once published
    reference = original_logits(written, tower, llm, ids, pixels)
    return [checked_logits("our model, read back in the original layout", ours, reference, log,
                           f"the original-layout files do not compute our logits ({out})")]


def _logits(model: Any, ids: list[int], pixels: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0].float()


def _aspect(processor: Any) -> str:
    return "pad" if getattr(processor.image_processor, "do_pad", False) else "square"


def _save_tensors(state: dict[str, Any], file: Path) -> None:
    from safetensors.torch import save_file

    write_atomically(file, lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def _torch_save(state: dict[str, Any], path: Path) -> None:
    import torch

    torch.save(state, path)


def describe(result: ToOriginalResult) -> str:
    """A one-line summary for the command."""
    checked = "verified" if result.checks else "not verified"
    base = f"'{result.model_base}'" if result.model_base else "None"
    how = (f"load_pretrained_model('{result.output_dir}', {base}, "
           "get_model_name_from_path(...))")
    return (f"{result.kind} output written in the original LLaVA layout to "
            f"{result.output_dir} ({checked}; mm_vision_tower {result.mm_vision_tower}); the "
            f"original reads it with {how}")
