"""Merge a LoRA/QLoRA run into its base and save a standalone, verified LLaVA checkpoint.

Order of work, so that at most one full-precision model is in memory at a time:
(QLoRA only: quantized base + adapter → reference logits, freed) → full-precision base +
adapter → reference logits → `merge_and_unload` in place → save into a staging folder →
free → reload the staging folder with stock transformers → compare logits → publish.
Peak memory: one unquantized base in `dtype` plus the (small) LoRA weights; the reload
happens after the merged model is freed.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import (
    MANIFEST_NAME,
    Base,
    CheckpointBase,
    MergedBase,
    OriginalBase,
    OutputKind,
    PartsBase,
    RunManifest,
)
from llava_cli.artifacts.output_dir import (
    STALE_WEIGHTS,
    drop_custom_code,
    publishing,
)
from llava_cli.artifacts.projector_file import ADAPTER_FILE, read_adapter_projector
from llava_cli.config.run_config import CONFIG_FILENAME
from llava_cli.data.text.stops import set_generation_stops
from llava_cli.merge.lora_run import (
    LoraRun,
    base_to_merge_into,
    find_lora_run,
    fingerprinted,
    load_base,
    load_processor,
)
from llava_cli.merge.verify import (
    Check,
    VerificationError,
    compare,
    probe_batch,
    probe_logits,
    tolerance,
)

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class MergeResult:
    """What `merge_lora` wrote and how it checked it."""

    output_dir: Path
    base: Base
    bits: int
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks that could not run, and why


def merge_lora(run_dir: str | Path, output_dir: str | Path, base: str | None = None,
               dtype: str = "float32", overwrite: bool = False, verify: bool = True,
               max_shard_size: str = "5GB", log: Callable[[str], None] = lambda _: None,
               trust_remote_code: bool = False) -> MergeResult:
    """Merge the adapter of `run_dir` into its base (or `base`) and save it to `output_dir`.

    Raises ValueError for bad inputs and VerificationError (leaving `output_dir` untouched)
    when the merged model does not reproduce base + adapter.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    run = find_lora_run(run_dir, trust_remote_code)
    out = Path(output_dir)
    base_info = base_to_merge_into(run, base)
    # Old weights that would shadow or mix with the new ones go only once the verified files
    # are in; never two merges (or a merge and a run) into one folder.
    with publishing(out, STALE_WEIGHTS, inputs=_inputs(out, run, base_info),
                    overwrite=overwrite) as staging:
        base_info = fingerprinted(run, base_info, explicit=bool(base))  # before any work
        bits = run.config.bits if run.config else 16
        result = MergeResult(out, base_info, bits)
        _merge(run, staging, base, base_info, dtype, verify, max_shard_size, bits, result, log)
    return result


def _merge(run: LoraRun, staging: Path, base: str | None, base_info: Base, dtype: str,
           verify: bool, max_shard_size: str, bits: int, result: MergeResult,
           log: Callable[[str], None]) -> None:
    processor = load_processor(run)
    batch = probe_batch(processor) if verify else None
    quantized_ref = None
    if verify and bits != 16:  # the model the adapter was trained against
        quantized_ref = _quantized_reference(run, base, bits, batch, result, log)
    reference = _merge_into(run, base, dtype, batch, staging, max_shard_size,
                            processor.tokenizer)
    _save_extras(run, processor, base_info, dtype, staging)
    drop_custom_code(staging)  # a stock LLaVA: no custom code a base's config referred to
    if verify:
        result.checks = _verify(staging, dtype, bits, batch, reference, quantized_ref, log)


def _inputs(out: Path, run: LoraRun, base: Base) -> dict[str, str | None]:
    """What the output may not be, contain or lie inside: the run and every folder the base
    is read from — except the base checkpoint itself with --overwrite (allowed: its
    fingerprint changes, so a later merge of a run trained on it is refused rather than
    applying the adapter twice)."""
    inputs: dict[str, str | None] = {"LoRA run": str(run.root)}
    if isinstance(base, CheckpointBase):
        same = out.resolve() == Path(base.path).resolve()
        inputs["base checkpoint"] = None if same else base.path
    elif isinstance(base, PartsBase):
        inputs.update({"base LLM": base.llm, "base vision tower": base.vision_tower})
    elif isinstance(base, OriginalBase):  # converted from the original layout on the fly
        inputs.update({"base original checkpoint": base.path, "base LLM": base.llm,
                       "base vision tower": base.vision_tower})
    inputs["base's projector file"] = getattr(base, "pretrained_projector", None)
    return inputs


def _quantized_reference(run: LoraRun, base: str | None, bits: int, batch: Any,
                         result: MergeResult, log: Callable[[str], None]) -> Any:
    """Logits of the quantized base + adapter, as trained; None (said, with the reason)
    where bitsandbytes cannot quantize on this machine."""
    from llava_cli.model.load import quantization_unavailable

    reason = quantization_unavailable()
    if reason is not None:
        result.skipped.append(f"verify vs {bits}-bit base + adapter, as trained: skipped "
                              f"({reason}); the merge itself is still checked")
        log(result.skipped[-1])
        return None
    return _reference(run, base, run.config.torch_dtype, bits, batch)


def _reference(run: LoraRun, base: str | None, dtype: str | None, bits: int,
               batch: Any) -> Any:
    """Logits of base + adapter (unmerged), then free both."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(run, base, dtype, bits), str(run.adapter))
    logits = probe_logits(model, batch)
    del model
    gc.collect()
    return logits


def _merge_into(run: LoraRun, base: str | None, dtype: str, batch: Any, staging: Path,
                max_shard_size: str, tokenizer: Any) -> Any:
    """Merge in place and save to `staging`; returns the unmerged reference logits (or None)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(run, base, dtype, 16), str(run.adapter))
    reference = probe_logits(model, batch) if batch is not None else None
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights
    del model
    _check_projector(merged, run)
    # The run's template decides where a turn ends, whatever its base's config said.
    set_generation_stops(merged.generation_config, tokenizer, run.manifest.template)
    merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
    del merged
    gc.collect()
    return reference


def _check_projector(merged: Any, run: LoraRun) -> None:
    """The trained projector (modules_to_save) must be what the merged model holds."""
    from llava_cli.model.parts import components

    if "lora_" in " ".join(name for name, _ in merged.named_parameters()):
        raise RuntimeError("merge_and_unload left LoRA layers in the model")
    try:
        trained = read_adapter_projector(run.adapter / ADAPTER_FILE)
    except ValueError:
        return  # the projector was frozen: the base's own projector is the right one
    held = components(merged).projector.state_dict()
    for key, tensor in trained.items():
        if not tensor.to(held[key].dtype).equal(held[key]):
            raise RuntimeError(f"merged projector {key} differs from the adapter's trained "
                               "copy (PEFT modules_to_save was not carried over)")


def _save_extras(run: LoraRun, processor: Any, base_info: Base, dtype: str,
                 staging: Path) -> None:
    """Processor/tokenizer/chat template, the training config and a `full` manifest."""
    processor.save_pretrained(str(staging))
    if (run.root / CONFIG_FILENAME).is_file():
        shutil.copy2(run.root / CONFIG_FILENAME, staging / CONFIG_FILENAME)
    recorded = run.manifest
    manifest = RunManifest(
        kind=OutputKind.FULL,
        base=MergedBase(adapter=str(run.adapter.resolve()), base=base_info),
        template=recorded.template, tokenization=recorded.tokenization,
        image_aspect_ratio=recorded.image_aspect_ratio, projector_type=recorded.projector_type,
        files=sorted({p.name for p in staging.iterdir()} | {MANIFEST_NAME}),
        extra={"merge": {"dtype": dtype}})
    manifest.write(staging)


def _verify(staging: Path, dtype: str, bits: int, batch: Any, reference: Any,
            quantized_ref: Any, log: Callable[[str], None]) -> list[Check]:
    """Reload the saved model with stock transformers and compare its logits."""
    import torch
    from transformers import AutoModelForImageTextToText  # LLaVA or LLaVA-NeXT

    from llava_cli.model.load import LLAVA_MODEL, load_pretrained

    model = load_pretrained(AutoModelForImageTextToText, str(staging), LLAVA_MODEL,
                            dtype=getattr(torch, dtype))
    logits = probe_logits(model, batch)
    del model
    gc.collect()
    checks = [compare("base + adapter (unmerged)", logits, reference, tolerance(dtype, 16))]
    if quantized_ref is not None:
        checks.append(compare(f"{bits}-bit base + adapter, as trained", logits, quantized_ref,
                              tolerance(dtype, bits)))
    for check in checks:
        log(check.describe())
    failed = [check for check in checks if not check.ok]
    if failed:
        raise VerificationError("merged model failed verification; nothing was written:\n  "
                                + "\n  ".join(c.describe() for c in failed))
    return checks


def describe(result: MergeResult) -> str:
    """A one-line summary for the command."""
    verified = "verified" if result.checks else "not verified (--no-verify)"
    if result.skipped:
        verified += f"; {len(result.skipped)} check skipped (see above)"
    return f"merged model written to {result.output_dir} ({verified})"

