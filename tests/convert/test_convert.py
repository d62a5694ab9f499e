"""`llava convert` both ways on the ORIGINAL LLaVA's own outputs (../shared original-llava):
the converted models compute the original's reference logits, the processor its pixels,
training and merge-lora take original folders, and our outputs go back to the original's
layout (its key names) and return with the same logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.inspect.inspection import demo_data

runner = CliRunner()
# transformers binds its log handler to the sys.stderr of its first use: were that inside a
# CliRunner call, every later warning would go to that call's closed stream.
transformers_logging.get_logger("transformers")
TRACEBACK = "Traceback (most recent call last)"
RECORDS, IMAGES = demo_data()
TRAIN = ["--data-path", RECORDS, "--image-folder", IMAGES, "--batch-size", "2",
         "--max-steps", "1", "--save-steps", "5", "--seed", "7", "--report-to", "none"]


@pytest.fixture(scope="module")
def original(assets: Path) -> Path:
    return assets / "original-llava"


def _cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert TRACEBACK not in result.output, result.output
    assert result.exit_code == code, result.output
    return result.output


def _train(*args: str) -> str:
    """A training command in its own process, as a user runs it (in-process, transformers'
    log handler would keep a stream an earlier CliRunner call has closed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # PYTHONPATH and the rest inherited
    done = subprocess.run([sys.executable, "-m", "llava_cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and TRACEBACK not in output, output
    return output


@pytest.fixture(scope="module")
def converted(original: Path, tmp_path_factory) -> dict[str, Path]:
    """full/, lora/ (+ tiny-vicuna) and projector/ converted with the CLI."""
    out = tmp_path_factory.mktemp("converted")
    base = original / "tiny-vicuna"
    said = _cli("convert", original / "full", "-o", out / "full")
    assert "verify vs the original full checkpoint" in said and " ok" in said
    _cli("convert", original / "lora", "-o", out / "lora", "--base", base)
    _cli("convert", original / "projector", "-o", out / "projector", "--base", base)
    return {name: out / name for name in ("full", "lora", "projector")}


def _reference_inputs(npz, image_token_id: int, count: int):
    ids = npz["input_ids"].tolist()
    assert ids.count(-200) == 1 and count == 49  # 224 px / patch 32: 7 x 7 patches
    at = ids.index(-200)
    ours = ids[:at] + [image_token_id] * count + ids[at + 1:]
    return torch.tensor([ours]), torch.tensor(npz["pixel_values"])[None]


def _image_tokens(folder: Path) -> tuple[int, int]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    return config.image_token_id, config.image_seq_length


def _stock_logits(folder: Path, ids, pixels):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0].float()


@pytest.mark.parametrize("name", ["full", "lora"])
def test_converted_model_reproduces_the_originals_logits(converted, original, name):
    npz = np.load(original / "reference" / f"{name}.npz")
    ids, pixels = _reference_inputs(npz, *_image_tokens(converted[name]))
    logits = _stock_logits(converted[name], ids, pixels)[:, :int(npz["vocab_size"])]
    assert logits.shape == (101, 32000)
    columns = logits[:, torch.tensor(npz["logits_columns"])].numpy()
    assert np.abs(columns - npz["logits"]).max() < 1e-3
    assert np.abs(torch.logsumexp(logits, -1).numpy() - npz["logsumexp"]).max() < 1e-3
    assert (logits.argmax(-1).numpy() == npz["argmax"]).all()


def test_a_full_checkpoints_frozen_tower_comes_from_the_checkpoint(converted, original):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(converted["full"]))
    ours = model.model.vision_tower.embeddings.patch_embedding.weight
    saved = load_file(str(original / "full" / "model.safetensors"))
    theirs = saved["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding."
                   "weight"]
    assert theirs.dtype == torch.float16 and torch.equal(ours, theirs.float())


def test_our_processor_serves_the_originals_pixels_and_prompt(converted, original, assets):
    from PIL import Image
    from transformers import AutoProcessor

    npz = np.load(original / "reference" / "full.npz")
    processor = AutoProcessor.from_pretrained(str(converted["full"]))
    image = Image.open(assets / "images" / "chelsea_cat.png").convert("RGB")
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    assert np.abs(pixels.numpy() - npz["pixel_values"]).max() < 1e-5  # pad: expand2square
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": str(npz["question"])}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == str(npz["prompt"])  # the v1 template the original prompted with
    served = processor(text=prompt, images=image, return_tensors="pt")
    assert torch.equal(served["pixel_values"][0], pixels)
    ids = npz["input_ids"].tolist()
    at = ids.index(-200)
    # The stock processor tokenizes the prompt whole: the original's tokenizer_image_token
    # (each side of <image> apart) has one more "▁" (29871) after the image; nothing else.
    assert ids[at + 1] == 29871
    expected = ids[:at] + [processor.image_token_id] * 49 + ids[at + 2:]
    assert served["input_ids"][0].tolist() == expected


def test_projector_run_becomes_a_pretrain_output_that_finetune_starts_from(
        converted, original, tmp_path):
    manifest = json.loads((converted["projector"] / "llava_run.json").read_text())
    assert manifest["kind"] == "projector" and manifest["base"]["type"] == "parts"
    ours = load_file(str(converted["projector"] / "projector.safetensors"))
    theirs = torch.load(original / "projector" / "mm_projector.bin", weights_only=True)
    assert torch.equal(ours["multi_modal_projector.linear_1.weight"],
                       theirs["model.mm_projector.0.weight"])
    assert torch.equal(ours["multi_modal_projector.linear_2.bias"],
                       theirs["model.mm_projector.2.bias"])
    _train("finetune", "--model-name-or-path", converted["projector"], "-o", tmp_path / "ft",
         *TRAIN)
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_finetune_takes_an_original_folder_directly(original, tmp_path):
    said = _train("finetune", "--model-name-or-path", original / "full", "-o", tmp_path / "ft",
                *TRAIN)
    assert "converted on the fly" in said
    manifest = json.loads((tmp_path / "ft" / "llava_run.json").read_text())
    assert manifest["base"]["type"] == "original"
    assert manifest["base"]["path"] == str((original / "full").resolve())


def test_a_lora_run_on_an_original_folder_merges_onto_it(original, tmp_path):
    run = tmp_path / "run"
    _train("lora", "--model-name-or-path", original / "full", "-o", run, "--lora-r", "8",
           "--lora-alpha", "16", *TRAIN)
    said = _cli("merge-lora", run, "-o", tmp_path / "merged")  # the base: converted again
    assert "verify vs base + adapter (unmerged)" in said and "FAILED" not in said
    manifest = json.loads((tmp_path / "merged" / "llava_run.json").read_text())
    assert manifest["base"]["base"]["type"] == "original"


def test_merge_lora_takes_an_original_lora_run_with_base(converted, original, tmp_path):
    _cli("merge-lora", original / "lora", "--base", original / "tiny-vicuna",
         "-o", tmp_path / "merged")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "merged" / file).read_bytes() == (converted["lora"] / file
                                                             ).read_bytes()


def _keys(file: Path) -> dict[str, str]:
    with safe_open(str(file), "pt") as handle:
        names = list(handle.keys())
        return {k: handle.get_slice(k).get_dtype() for k in names}


def test_full_round_trip_through_the_original_layout(converted, original, tmp_path):
    back = tmp_path / "llava-full"
    said = _cli("convert", converted["full"], "--to", "llava", "-o", back)
    assert "verify vs our model, read back in the original layout" in said
    ours, theirs = _keys(back / "model.safetensors"), _keys(original / "full" /
                                                            "model.safetensors")
    assert set(ours) == set(theirs)  # exactly the original's key names
    tower = "model.vision_tower."
    assert {k: v for k, v in ours.items() if not k.startswith(tower)} == {
        k: v for k, v in theirs.items() if not k.startswith(tower)}  # F32 as the original's
    written, source = (load_file(str(f / "model.safetensors")) for f in (back, original / "full"))
    assert all(torch.equal(written[k], source[k].to(written[k].dtype)) for k in source)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["vocab_size"] == 32000
    shared = json.loads((original / "full" / "config.json").read_text())
    assert {k for k in config if k.startswith("mm_")} == {k for k in shared
                                                          if k.startswith("mm_")}
    assert {k: config[k] for k in shared if k.startswith("mm_") and k != "mm_vision_tower"
            } == {k: v for k, v in shared.items() if k.startswith("mm_")
                  and k != "mm_vision_tower"}
    assert config["mm_vision_tower"] == str((back / "vision_tower").resolve())
    again = tmp_path / "again"
    _cli("convert", back, "-o", again)  # the tower: mm_vision_tower, as written
    npz = np.load(original / "reference" / "full.npz")
    ids, pixels = _reference_inputs(npz, *_image_tokens(again))
    assert torch.equal(_stock_logits(again, ids, pixels), _stock_logits(converted["full"], ids,
                                                                        pixels))


def test_lora_run_goes_to_the_originals_layout_and_back(converted, original, tmp_path):
    run = tmp_path / "run"
    _train("lora", "--model-name-or-path", converted["projector"], "-o", run, "--lora-r", "8",
         "--lora-alpha", "16", *TRAIN)
    _cli("convert", run, "--to", "llava", "-o", tmp_path / "llava-run", code=2)  # name rule
    back = tmp_path / "llava-lora-run"
    _cli("convert", run, "--to", "llava", "-o", back)
    shared = original / "lora"
    pattern = {_layer_free(k) for k in _keys(shared / "adapter_model.safetensors")}
    assert {_layer_free(k) for k in _keys(back / "adapter_model.safetensors")} <= pattern
    non_lora = torch.load(back / "non_lora_trainables.bin", weights_only=True)
    assert set(non_lora) == set(torch.load(shared / "non_lora_trainables.bin",
                                           weights_only=True))
    adapter = json.loads((back / "adapter_config.json").read_text())
    assert set(adapter) == set(json.loads((shared / "adapter_config.json").read_text()))
    assert adapter["base_model_name_or_path"] == str((original / "tiny-vicuna").resolve())
    merged, again = tmp_path / "merged", tmp_path / "again"
    _cli("merge-lora", run, "-o", merged)
    _cli("convert", back, "--base", original / "tiny-vicuna", "-o", again)
    npz = np.load(original / "reference" / "lora.npz")
    ids, pixels = _reference_inputs(npz, *_image_tokens(again))
    vocab = int(npz["vocab_size"])
    diff = (_stock_logits(again, ids, pixels)[:, :vocab]
            - _stock_logits(merged, ids, pixels)[:, :vocab]).abs().max()
    assert diff < 1e-4


def _layer_free(key: str) -> str:
    import re

    return re.sub(r"layers\.\d+\.", "layers.N.", key)


def _one_line_error(*args: str) -> str:
    output = _cli(*args, code=2)
    line = output.strip().splitlines()[-1]
    assert line.startswith("llava "), output
    return line


def test_bad_inputs_are_one_line_errors(original, tmp_path):
    line = _one_line_error("convert", original / "tiny-vicuna", "-o", tmp_path / "a")
    assert "is not an original LLaVA checkpoint" in line
    line = _one_line_error("convert", original / "full", "-o", tmp_path / "b",
                           "--vision-tower", tmp_path / "nowhere")
    assert "--vision-tower" in line
    moved = tmp_path / "alone" / "full"
    moved.mkdir(parents=True)
    for file in (original / "full").iterdir():
        (moved / file.name).symlink_to(file)
    line = _one_line_error("convert", moved, "-o", tmp_path / "c")
    assert "mm_vision_tower" in line and "pass --vision-tower PATH" in line
    linear = tmp_path / "linear"
    shutil.copytree(moved, linear, symlinks=True)
    config = json.loads((original / "full" / "config.json").read_text())
    (linear / "config.json").unlink()
    (linear / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    line = _one_line_error("convert", linear, "-o", tmp_path / "d",
                           "--vision-tower", original / "tiny-clip")
    assert "mm_projector_type 'linear'" in line and "mlp2x_gelu" in line
    assert not (tmp_path / "d").exists()


def test_help_lists_convert_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from llava_cli.cli import app; "
            "r = CliRunner().invoke(app, ['convert', '--help']); print(r.output); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "NO-TORCH" in out and "--to" in out and "--tower-name" in out


def test_merge_lora_of_an_original_run_refuses_options_it_cannot_honour(original, tmp_path):
    message = _cli("merge-lora", original / "lora", "--base", original / "tiny-vicuna",
                   "-o", tmp_path / "merged", "--dtype", "bfloat16", code=2)
    assert "--dtype: not available for an original LLaVA LoRA run" in message
    assert not (tmp_path / "merged").exists()
