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
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.config import CONFIG_FILENAME, RunConfig
from llava_cli.manifest import MANIFEST_NAME, RunManifest, read_manifest
from llava_cli.merge_verify import Check, compare, probe_batch, probe_logits, tolerance

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DTYPES = ("float32", "bfloat16", "float16")
# Files a previous model in OUT may have left that would shadow the new weights on load.
_STALE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                  "pytorch_model.bin.index.json")


class VerificationError(RuntimeError):
    """The merged model's logits differ from base + adapter by more than the tolerance."""


@dataclass
class LoraRun:
    """A LoRA run as found on disk: where its manifest, config and adapter are."""

    root: Path  # the run directory (holds llava_run.json and llava_config.yaml)
    adapter: Path  # root, or one of its checkpoint-N folders
    manifest: RunManifest
    config: RunConfig | None  # the resolved training configuration, when saved


@dataclass
class MergeResult:
    """What `merge_lora` wrote and how it checked it."""

    output_dir: Path
    base: dict[str, Any]
    bits: int
    checks: list[Check] = field(default_factory=list)


def find_lora_run(run_dir: str | Path) -> LoraRun:
    """The LoRA run at `run_dir`, or the run whose checkpoint-N `run_dir` is."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} not found")
    root = path if (path / MANIFEST_NAME).is_file() else path.parent
    manifest = read_manifest(root)
    if manifest is None:
        raise ValueError(f"{path}: no {MANIFEST_NAME} here or in its parent; merge-lora needs "
                         "a run directory written by `llava lora` / `llava finetune --lora`")
    if manifest.kind != "lora":
        raise ValueError(f"{root} is a {manifest.kind} run: nothing to merge (merge-lora takes "
                         "a LoRA or QLoRA run)")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path}: no LoRA adapter ({', '.join(missing)} missing)")
    return LoraRun(root, path, manifest, _saved_config(root))


def _saved_config(root: Path) -> RunConfig | None:
    import yaml

    file = root / CONFIG_FILENAME
    return RunConfig.model_validate(yaml.safe_load(file.read_text())) if file.is_file() else None


def merge_lora(run_dir: str | Path, output_dir: str | Path, base: str | None = None,
               dtype: str = "float32", overwrite: bool = False, verify: bool = True,
               max_shard_size: str = "5GB",
               log: Callable[[str], None] = lambda _: None) -> MergeResult:
    """Merge the adapter of `run_dir` into its base (or `base`) and save it to `output_dir`.

    Raises ValueError for bad inputs and VerificationError (leaving `output_dir` untouched)
    when the merged model does not reproduce base + adapter.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    run = find_lora_run(run_dir)
    out = Path(output_dir)
    _check_output(out, run, overwrite)
    bits = run.config.bits if run.config else 16
    base_info = {"type": "llava", "path": str(Path(base).resolve())} if base else _base_info(run)
    result = MergeResult(out, base_info, bits)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        processor = _load_processor(run)
        batch = probe_batch(processor) if verify else None
        quantized_ref = None
        if verify and bits != 16:  # the model the adapter was trained against
            quantized_ref = _reference(run, base, run.config.torch_dtype, bits, batch)
        reference = _merge_into(run, base, dtype, batch, staging, max_shard_size)
        _save_extras(run, processor, base_info, dtype, staging)
        if verify:
            result.checks = _verify(staging, dtype, bits, batch, reference, quantized_ref, log)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after _publish; on error: cleanup
    return result


def _base_info(run: LoraRun) -> dict[str, Any]:
    """The run's recorded base; a relative path (a pretrain run's `base/`) is anchored by
    the model the run started from, so the merged manifest still says where it came from."""
    info = dict(run.manifest.base)
    if not Path(str(info.get("path", "/"))).is_absolute() and run.config:
        info["started_from"] = run.config.model_name_or_path
    return info


def _check_output(out: Path, run: LoraRun, overwrite: bool) -> None:
    if out.resolve() in (run.root.resolve(), run.adapter.resolve()):
        raise ValueError(f"--output-dir {str(out)!r} is the run directory; choose another")
    from llava_cli.outputs import refuse_unsafe_output_dir

    refuse_unsafe_output_dir(out, overwrite)


def _load_processor(run: LoraRun) -> Any:
    from transformers import AutoProcessor

    folder = run.adapter if (run.adapter / "processor_config.json").is_file() else run.root
    remote = bool(run.config and run.config.trust_remote_code)
    return AutoProcessor.from_pretrained(str(folder), trust_remote_code=remote)


def _load_base(run: LoraRun, base: str | None, dtype: str | None, bits: int) -> Any:
    """The base model, unquantized in `dtype` (bits 16) or quantized as in training."""
    from llava_cli.model_factory import load_llava

    saved = run.config or RunConfig()
    settings = saved.model_copy(update={"torch_dtype": dtype, "bits": bits})
    recorded = run.manifest.base
    if base:
        return load_llava(str(Path(base).resolve()), settings, for_training=False)
    path = recorded.get("path") if recorded.get("type") == "llava" else None
    # A relative path ("base" of a random-init pretrain) or an added projector file: the
    # recorded path alone is not the model that was trained on.
    if path and Path(path).is_absolute() and "pretrained_projector" not in recorded:
        return load_llava(path, settings, for_training=False)
    # Composed at training time (LLM + vision + projector): rebuild it the same way.
    if run.config is None or not run.config.model_name_or_path:
        raise ValueError(f"{run.root}: its base {recorded} cannot be rebuilt without "
                         f"{CONFIG_FILENAME}; pass --base CHECKPOINT")
    if recorded.get("type") == "parts" and recorded.get("random_init"):
        raise ValueError(f"{run.root}: the base was random-initialised and never saved; "
                         "there is nothing to merge into (pass --base CHECKPOINT)")
    from llava_cli.checkpoints import load_starting_model

    model = load_starting_model(settings).model
    model.eval()
    model.requires_grad_(False)
    return model


def _reference(run: LoraRun, base: str | None, dtype: str | None, bits: int,
               batch: Any) -> Any:
    """Logits of base + adapter (unmerged), then free both."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(run, base, dtype, bits), str(run.adapter))
    logits = probe_logits(model, batch)
    del model
    gc.collect()
    return logits


def _merge_into(run: LoraRun, base: str | None, dtype: str, batch: Any, staging: Path,
                max_shard_size: str) -> Any:
    """Merge in place and save to `staging`; returns the unmerged reference logits (or None)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load_base(run, base, dtype, 16), str(run.adapter))
    reference = probe_logits(model, batch) if batch is not None else None
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf weights
    del model
    _check_projector(merged, run)
    merged.save_pretrained(str(staging), max_shard_size=max_shard_size)
    del merged
    gc.collect()
    return reference


def _check_projector(merged: Any, run: LoraRun) -> None:
    """The trained projector (modules_to_save) must be what the merged model holds."""
    from llava_cli.export import ADAPTER_FILE, read_adapter_projector
    from llava_cli.model_factory import components

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


def _save_extras(run: LoraRun, processor: Any, base_info: dict[str, Any], dtype: str,
                 staging: Path) -> None:
    """Processor/tokenizer/chat template, the training config and a `full` manifest."""
    processor.save_pretrained(str(staging))
    if (run.root / CONFIG_FILENAME).is_file():
        shutil.copy2(run.root / CONFIG_FILENAME, staging / CONFIG_FILENAME)
    recorded = run.manifest
    manifest = RunManifest(
        kind="full",
        base={"type": "merged", "adapter": str(run.adapter.resolve()), "base": base_info},
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

    model = AutoModelForImageTextToText.from_pretrained(str(staging),
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


def _publish(staging: Path, out: Path) -> None:
    """Move the verified files into `out`: a rename when it is new, else file by file."""
    if not out.exists():
        os.rename(staging, out)
        return
    for pattern in _STALE_WEIGHTS:  # old weights would shadow or mix with the new ones
        for stale in out.glob(pattern):
            stale.unlink()
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir() and item.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)


def describe(result: MergeResult) -> str:
    """A one-line summary for the command."""
    verified = "verified" if result.checks else "not verified (--no-verify)"
    return f"merged model written to {result.output_dir} ({verified})"

