"""merge-lora and export-projector on real tiny runs: pretrain → finetune → LoRA / QLoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from llava_cli.artifacts.export import export_projector
from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.inspect.inspection import demo_data
from llava_cli.merge.merge import merge_lora
from llava_cli.merge.verify import probe_batch, probe_logits
from llava_cli.model.parts import components
from llava_cli.model.projector import load_projector_weights
from llava_cli.train.run import run_training
from tests.helpers import PLAIN_SCHEDULE, TINY_LLM, TINY_VISION

RECORDS, IMAGES = demo_data()
COMMON = {"data_path": RECORDS, "image_folder": IMAGES, "per_device_train_batch_size": 2,
          "save_steps": 2, "overwrite": True, "learning_rate": 1e-2, "seed": 7, **PLAIN_SCHEDULE}
LLAVA_KEYS = ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
              "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
runner = CliRunner()


def _config(stage: str, out: Path, **keys):
    return resolve_config(stage, flags={**COMMON, "output_dir": str(out), **keys})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny pretrain, finetune, LoRA and 4-bit QLoRA runs (random-init parts, demo data)."""
    root = tmp_path_factory.mktemp("merge_runs")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        run_training(_config("pretrain", root / "pretrain", model_name_or_path=str(TINY_LLM),
                             vision_tower=str(TINY_VISION), tokenizer="demo", random_init=True,
                             skip_bad_records=True, max_steps=2))
    run_training(_config("finetune", root / "full", model_name_or_path=str(root / "pretrain"),
                         max_steps=2))
    for name, bits in (("lora", 16), ("qlora", 4)):
        run_training(_config("lora", root / name, model_name_or_path=str(root / "full"),
                             max_steps=2, lora_r=8, lora_alpha=16, bits=bits,
                             learning_rate=2e-2))
    return {name: root / name for name in ("pretrain", "full", "lora", "qlora")}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = tmp_path_factory.mktemp("merged")
    return {name: (out / name, merge_lora(runs[name], out / name)) for name in ("lora", "qlora")}


def _stock(path: Path):
    return (transformers.LlavaForConditionalGeneration.from_pretrained(path),
            transformers.AutoProcessor.from_pretrained(path))


def _adapter_logits(base_dir: Path, adapter: Path, batch, **load) -> torch.Tensor:
    from peft import PeftModel

    base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir, **load)
    return probe_logits(PeftModel.from_pretrained(base, adapter), batch)


def _keys(folder: Path) -> list[str]:
    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys += list(handle.keys())
    return keys


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merged_model_matches_base_plus_adapter(runs, merged, name):
    out, result = merged[name]
    model, processor = _stock(out)
    batch = probe_batch(processor)
    logits = probe_logits(model, batch)
    reference = _adapter_logits(runs["full"], runs[name], batch)
    assert (logits - reference).abs().max() < 1e-4
    base_only = probe_logits(transformers.LlavaForConditionalGeneration.from_pretrained(
        runs["full"]), batch)
    assert (logits - base_only).abs().max() > 1e-3  # the adapter really changed something
    assert all(check.ok for check in result.checks)
    keys = _keys(out)
    assert keys and not [k for k in keys if "lora_" in k or "base_layer" in k]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # full precision, never a quantized base
    manifest = json.loads((out / "llava_run.json").read_text())
    assert manifest["kind"] == "full" and manifest["base"]["type"] == "merged"
    assert manifest["base"]["adapter"] == str(runs[name].resolve())
    assert manifest["base"]["base"]["path"] == str(runs["full"].resolve())
    assert {"llava_config.yaml", "chat_template.jinja", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    # The trained projector (modules_to_save) is the merged model's projector.
    trained = load_file(runs[name] / "adapter_model.safetensors")
    held = components(model).projector.state_dict()
    for key, tensor in held.items():
        assert torch.equal(tensor, trained[f"base_model.model.model.multi_modal_projector.{key}"])


def test_qlora_merge_is_checked_against_the_quantized_base_too(runs, merged):
    _, result = merged["qlora"]
    quantized = [c for c in result.checks if "4-bit" in c.against]
    assert len(quantized) == 1 and quantized[0].ok and quantized[0].max_abs_diff > 1e-4
    assert quantized[0].tolerance > result.checks[0].tolerance


def test_merged_model_runs_in_a_pipeline(merged):
    pipe = transformers.pipeline("image-text-to-text", model=str(merged["lora"][0]))
    from llava_cli.merge.verify import probe_image

    messages = [{"role": "user", "content": [{"type": "image", "image": probe_image()},
                                             {"type": "text", "text": "What is it?"}]}]
    out = pipe(text=messages, max_new_tokens=3)
    assert out and out[0]["generated_text"]


def test_merge_cli_checkpoint_dir_and_refusals(runs, tmp_path):
    result = runner.invoke(app, ["merge-lora", str(runs["lora"] / "checkpoint-2"),
                                 "-o", str(tmp_path / "ckpt"), "--dtype", "bfloat16",
                                 "--base", str(runs["full"])])
    assert result.exit_code == 0, result.output
    assert "verify vs base + adapter (unmerged)" in result.output and "ok" in result.output
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    manifest = json.loads((tmp_path / "ckpt" / "llava_run.json").read_text())
    assert manifest["base"]["adapter"].endswith("checkpoint-2")
    full = runner.invoke(app, ["merge-lora", str(runs["full"]), "-o", str(tmp_path / "x")])
    assert full.exit_code == 2 and "is a full run: nothing to merge" in full.output
    (tmp_path / "plain").mkdir()
    missing = runner.invoke(app, ["merge-lora", str(tmp_path / "plain"), "-o",
                                  str(tmp_path / "y")])
    assert missing.exit_code == 2 and "no llava_run.json" in missing.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    busy = runner.invoke(app, ["merge-lora", str(runs["lora"]), "-o", str(tmp_path / "busy")])
    assert busy.exit_code == 2 and "is not empty; pass --overwrite" in busy.output
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging left behind


def test_failed_verification_writes_nothing_and_overwrite_keeps_user_files(runs, tmp_path,
                                                                          monkeypatch):
    from llava_cli.merge import verify as merge_verify
    from llava_cli.merge.merge import VerificationError

    out = tmp_path / "out"
    monkeypatch.setitem(merge_verify._TOLERANCES, ("float32", 16), (-1.0, 0.0))
    with pytest.raises(VerificationError, match="nothing was written"):
        merge_lora(runs["lora"], out)
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    merge_lora(runs["lora"], out, overwrite=True, verify=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]


@pytest.mark.parametrize("source", ["pretrain", "full", "lora", "merged"])
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_export_round_trips_bit_identical(runs, merged, tmp_path, source, suffix):
    folder = merged["lora"][0] if source == "merged" else runs[source]
    file = tmp_path / f"projector{suffix}"
    result = runner.invoke(app, ["export-projector", str(folder), "-o", str(file)])
    assert result.exit_code == 0, result.output
    expected = _projector_of(runs, merged, source)
    if suffix == ".bin":
        state = torch.load(file, weights_only=True)
        assert sorted(state) == LLAVA_KEYS
        mapped = {k.replace("model.mm_projector.0.", "linear_1.")
                  .replace("model.mm_projector.2.", "linear_2."): v for k, v in state.items()}
    else:
        state = load_file(file)
        mapped = {k.removeprefix("multi_modal_projector."): v for k, v in state.items()}
        info = json.loads(Path(f"{file}.json").read_text())
        assert info["in_features"] == 32 and info["out_features"] == 64
        assert info["projector_type"] == "mlp2x_gelu" and info["dtype"] == "float32"
    assert sorted(mapped) == sorted(expected)
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    # Re-import (what `finetune --pretrained-projector FILE` does) is bit-identical.
    model = transformers.LlavaForConditionalGeneration.from_pretrained(runs["full"])
    load_projector_weights(model, file)
    loaded = components(model).projector.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def _projector_of(runs, merged, source: str) -> dict[str, torch.Tensor]:
    """The projector as the model itself holds it (loaded with stock transformers)."""
    if source == "pretrain":
        return {k.removeprefix("multi_modal_projector."): v
                for k, v in load_file(runs["pretrain"] / "projector.safetensors").items()}
    if source == "lora":
        source, path = "merged", merged["lora"][0]  # the merged model holds the trained copy
    else:
        path = merged["lora"][0] if source == "merged" else runs[source]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path)
    return {k: v.clone() for k, v in components(model).projector.state_dict().items()}


def test_export_sharded_checkpoint(runs, tmp_path):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(runs["full"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    result = export_projector(tmp_path / "sharded", tmp_path / "p.bin")
    state = torch.load(result.output, weights_only=True)
    expected = components(model).projector.state_dict()
    assert torch.equal(state["model.mm_projector.2.weight"], expected["linear_2.weight"])


def test_export_errors(runs, tmp_path):
    unknown = runner.invoke(app, ["export-projector", str(runs["full"]), "-o",
                                  str(tmp_path / "p.npz")])
    assert unknown.exit_code == 2 and "cannot tell the format" in unknown.output
    forced = runner.invoke(app, ["export-projector", str(runs["full"]), "-o",
                                 str(tmp_path / "p.weights"), "--format", "llava"])
    assert forced.exit_code == 0 and torch.load(tmp_path / "p.weights", weights_only=True)
    # A projector for another LLM size is refused on import, naming both shapes.
    other = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=4),
        text_config=transformers.LlamaConfig(
            vocab_size=600, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=4)))
    shapes = r"has shape \(64,( 32)?\) but this model needs \(48,( 32)?\)"
    with pytest.raises(ValueError, match=shapes):
        load_projector_weights(other, tmp_path / "p.weights")


def test_a_run_folder_never_makes_merge_execute_its_code(runs, tmp_path):
    """A LoRA folder whose saved configuration says trust_remote_code and whose processor
    config points at a Python file it ships: that file runs only with --trust-remote-code on
    the user's own command line."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    saved = yaml.safe_load((run / "llava_config.yaml").read_text())
    (run / "llava_config.yaml").write_text(yaml.safe_dump({**saved, "trust_remote_code": True}))
    marker = tmp_path / "executed"
    (run / "evil.py").write_text(  # a subclass: loading it must not touch LlavaProcessor itself
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaProcessor\n\n\n"
        "class EvilProcessor(LlavaProcessor):\n    pass\n")
    config = json.loads((run / "processor_config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (run / "processor_config.json").write_text(json.dumps(config))
    refused = runner.invoke(app, ["merge-lora", str(run), "-o", str(tmp_path / "m1"),
                                  "--no-verify"])
    assert not marker.exists(), "code from the run folder ran without --trust-remote-code"
    assert "Traceback" not in refused.output
    runner.invoke(app, ["merge-lora", str(run), "-o", str(tmp_path / "m2"), "--no-verify",
                        "--trust-remote-code"])
    assert marker.exists()  # the same folder with the user's flag: the attack was real


def test_export_never_replaces_a_file_without_overwrite(runs, tmp_path):
    """`export-projector RUN -o RUN/model.safetensors` replaced a whole model with a projector
    and exited 0; an output inside its input is refused (even with --overwrite), an existing
    file needs --overwrite, and a directory is refused."""
    run = tmp_path / "full"
    shutil.copytree(runs["full"], run)
    model = (run / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["export-projector", str(run), "-o",
                                 str(run / "model.safetensors")])
    assert result.exit_code == 2 and "is the checkpoint file model.safetensors" in result.stderr
    assert (run / "model.safetensors").read_bytes() == model
    result = runner.invoke(app, ["export-projector", str(run), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.stderr
    target = tmp_path / "p.bin"
    assert runner.invoke(app, ["export-projector", str(run), "-o", str(target)]).exit_code == 0
    again = runner.invoke(app, ["export-projector", str(run), "-o", str(target)])
    assert again.exit_code == 2
    assert runner.invoke(app, ["export-projector", str(run), "-o", str(target),
                               "--overwrite"]).exit_code == 0


def test_a_base_changed_since_training_is_refused_and_a_copy_of_it_is_not(runs, tmp_path):
    """The run's manifest holds a fingerprint of its base's weight files. Once the base is
    overwritten (here by the merge itself, `-o BASE --overwrite`, which is allowed), merging
    the run again would apply its delta twice: refused, with or without --base, and nothing
    is written. A byte-identical copy of the original base elsewhere is the same base."""
    from llava_cli.artifacts.manifest import base_fingerprint, read_manifest

    base = Path(shutil.copytree(runs["full"], tmp_path / "base"))
    original = Path(shutil.copytree(base, tmp_path / "original"))
    lora = tmp_path / "lora"
    run_training(_config("lora", lora, model_name_or_path=str(base), max_steps=1, lora_r=4,
                         lora_alpha=8))
    recorded = read_manifest(lora).base
    assert recorded.fingerprint == base_fingerprint(recorded) is not None
    merge_lora(lora, base, overwrite=True, verify=False)  # the base is now the merged model
    for given, message in ((None, "has changed since the run was trained"),
                           (str(base), "is not the base the run was trained on")):
        with pytest.raises(ValueError, match=rf"{base}.* {message}: .*pass the original base "
                                             "with --base, or re-train"):
            merge_lora(lora, tmp_path / "again", base=given)
        assert not (tmp_path / "again").exists()
    result = merge_lora(lora, tmp_path / "from-copy", base=str(original))
    assert result.checks and all(check.ok for check in result.checks)
    merged = read_manifest(tmp_path / "from-copy").base.base
    assert merged.path == str(original.resolve()) and merged.fingerprint == recorded.fingerprint
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_explicit_base_cannot_stand_in_for_a_composed_one(runs, tmp_path):
    """A base composed at training time (LLM + vision tower, or a checkpoint + a projector
    file) has no single folder to check --base against: refused, naming what it was."""
    from llava_cli.artifacts.manifest import CheckpointBase, PartsBase, RunManifest
    from llava_cli.merge.lora_run import find_lora_run, fingerprinted

    run = find_lora_run(runs["lora"])
    composed = [PartsBase(llm="/m/llm", vision_tower="/m/clip", fingerprint="sha256:1"),
                CheckpointBase(path=str(runs["full"]), pretrained_projector="/p/projector.bin",
                               fingerprint="sha256:1")]
    for recorded in composed:
        run.manifest = RunManifest(kind="lora", base=recorded, template="v1",
                                   tokenization="hf", image_aspect_ratio="pad")
        with pytest.raises(ValueError, match=r"composed at training time \((LLM /m/llm|.*"
                                             r"projector /p/projector.bin).*drop --base"):
            fingerprinted(run, CheckpointBase(path=str(runs["full"])), explicit=True)


def test_merge_output_never_overlaps_the_run_or_its_base(runs, tmp_path):
    for out, relation in ((runs["lora"], "is the LoRA run"),
                          (runs["lora"] / "merged", "lies inside the LoRA run"),
                          (runs["lora"].parent, "contains the LoRA run"),
                          (runs["full"] / "merged", "lies inside the base checkpoint")):
        before = sorted(p.name for p in out.parent.iterdir())
        result = runner.invoke(app, ["merge-lora", str(runs["lora"]), "-o", str(out),
                                     "--overwrite", "--no-verify"])
        assert result.exit_code == 2 and relation in result.output, result.output
        assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing made


def test_the_quantized_check_is_skipped_with_a_reason_where_bitsandbytes_cannot_run(
        runs, tmp_path, monkeypatch):
    from llava_cli.model import load

    monkeypatch.setattr(load, "quantization_unavailable", lambda: "no backend here (test)")
    result = runner.invoke(app, ["merge-lora", str(runs["qlora"]), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert ("verify vs 4-bit base + adapter, as trained: skipped (no backend here (test)); the "
            "merge itself is still checked") in result.output
    assert "verify vs base + adapter (unmerged)" in result.output
    assert "looser tolerance" not in result.output and "1 check skipped" in result.output
