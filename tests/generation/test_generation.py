"""`llava generate` and the generation API on a tiny model trained here (pretrain → finetune)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from llava_cli.answers.generator import clean_answer, generation_kwargs
from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.data.images import prepare_image
from llava_cli.data.text.templates import TEMPLATES, Message, render
from llava_cli.demo.shapes import QUESTIONS, generate_split
from llava_cli.generation.answering_model import load_for_generation
from llava_cli.train.run import run_training
from tests.helpers import PLAIN_SCHEDULE

COMMON = {"per_device_train_batch_size": 2, "save_steps": 100, "overwrite": True,
          "learning_rate": 1e-2, "seed": 7, **PLAIN_SCHEDULE}
QUESTION = QUESTIONS["color"]


def _train(stage: str, data: Path, out: Path, **keys):
    flags = {**COMMON, "data_path": str(data), "image_folder": str(data.parent),
             "output_dir": str(out), **keys}
    return run_training(resolve_config(stage, flags=flags)).output_dir


@pytest.fixture(scope="module")
def runs(tiny_pretrain_finetune, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny pretrain and finetune runs (random init, 2 steps each) and a LoRA
    run (1 step) on them."""
    root = tmp_path_factory.mktemp("gen")
    data = {kind: generate_split(root / kind, 4, 0, kind) for kind in ("lora", "eval")}
    finetune = tiny_pretrain_finetune["finetune"]
    lora = _train("lora", data["lora"], root / "lora-run", max_steps=1, lora_r=4, lora_alpha=8,
                  model_name_or_path=str(finetune))
    return {"pretrain": tiny_pretrain_finetune["pretrain"], "finetune": finetune, "lora": lora,
            "eval": data["eval"]}


@pytest.fixture(scope="module")
def generator(runs):
    return load_for_generation(runs["finetune"])


@pytest.fixture(scope="module")
def picture(runs) -> Image.Image:
    return Image.open(runs["eval"].parent / "images" / "eval-00000.png").convert("RGB")


def test_answer_equals_plain_generate_on_the_chat_template_prompt(generator, picture):
    model, processor, template = generator.model, generator.processor, generator.template
    assert template == "v1" and generator.image_aspect_ratio == "pad"
    reply = generator.answer(picture, QUESTION, max_new_tokens=6)
    assert isinstance(reply, str) and reply == generator.answer(picture, QUESTION, 6)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    # The chat template renders exactly the training template.
    assert text == render(TEMPLATES["v1"], [Message("user", f"<image>\n{QUESTION}")],
                          add_generation_prompt=True).text
    padded = prepare_image(picture, "pad", processor.image_processor.image_mean)
    inputs = processor(images=padded, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    plain = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:],
                                       skip_special_tokens=True)
    assert reply == plain.strip()


def test_text_only_prompt(generator):
    assert isinstance(generator.answer(None, "Hello!", max_new_tokens=3), str)


def test_stop_strings(generator):
    processor = generator.processor
    eos = processor.tokenizer.eos_token_id
    single = generation_kwargs(processor, "v1", 5)  # "</s>" is the EOS token itself
    assert single["eos_token_id"] == [eos, eos] and single["stopping_criteria"] is None
    several = generation_kwargs(processor, "vicuna_v0", 5)  # "###": a stop-string criterion
    assert several["stopping_criteria"] is not None and several["do_sample"] is False
    assert clean_answer(" red###Human: hi", "vicuna_v0") == "red"
    assert clean_answer(" red</s>", "v1") == "red"


def test_lora_run_loads_its_base_through_the_manifest(runs, picture):
    from peft import PeftModel

    lora = load_for_generation(runs["lora"])
    assert isinstance(lora.model, PeftModel) and lora.template == "v1"
    explicit = load_for_generation(runs["finetune"], adapter=runs["lora"])
    assert lora.answer(picture, QUESTION, 4) == explicit.answer(picture, QUESTION, 4)


def test_pretrain_output_is_refused_clearly(runs):
    with pytest.raises(ValueError, match="pretrain output .*no trained LLM.*finetune"):
        load_for_generation(runs["pretrain"])
    result = CliRunner().invoke(app, ["generate", str(runs["pretrain"]), "--prompt", "Hi"])
    assert result.exit_code == 2 and "no trained LLM" in result.stderr  # bad input: 2


def test_cli_single_mode_streams_the_answer(runs, generator, picture):
    image = runs["eval"].parent / "images" / "eval-00000.png"
    result = CliRunner().invoke(app, ["generate", str(runs["finetune"]), "--image", str(image),
                                      "--prompt", QUESTION, "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == generator.answer(picture, QUESTION, 4)


def test_cli_batch_mode_writes_one_line_per_record(runs, tmp_path):
    records = json.loads(runs["eval"].read_text())
    records.append({"id": "chat", "conversations": [{"from": "human", "value": "Hello!"}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(app, [
        "generate", str(runs["finetune"]), "--data", str(data), "--image-folder",
        str(runs["eval"].parent), "--output", str(out), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    assert all(set(line) == {"id", "prompt", "answer", "reference"} for line in lines)
    assert [line["reference"] for line in lines] == [r.get("answer") for r in records]
    assert lines[0]["prompt"] == QUESTIONS[records[0]["question_type"]]
    assert all(isinstance(line["answer"], str) for line in lines)
    assert not out.with_name(out.name + ".partial").exists()
    again = CliRunner().invoke(app, [  # an existing answers file is never truncated silently
        "generate", str(runs["finetune"]), "--data", str(data), "--output", str(out)])
    assert again.exit_code == 2 and "pass --overwrite" in again.stderr
    assert len(out.read_text().splitlines()) == len(records)


def test_cli_usage_errors(runs):
    result = CliRunner().invoke(app, ["generate", str(runs["finetune"])])
    assert result.exit_code == 2 and "--prompt" in result.stderr


def test_generation_sees_the_pixels_training_saw_on_a_transparent_photo(runs, generator,
                                                                        tmp_path):
    """One image loader: a non-square picture with transparent pixels reaches the model with
    the pixel values its training sample had, given as a path or as an opened image
    (transparency on the mean colour, then padded with it; generate used to put it on white,
    or drop the alpha channel)."""
    from llava_cli.train.stages.supervised import build_dataset

    picture = Image.new("RGBA", (48, 30), (200, 30, 30, 255))
    picture.paste((0, 255, 0, 0), (0, 0, 20, 30))  # transparent, with green behind
    picture.save(tmp_path / "clear.png")
    records = [{"id": "clear", "image": "clear.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]}]
    (tmp_path / "records.json").write_text(json.dumps(records))
    config = resolve_config("finetune", flags={
        "data_path": str(tmp_path / "records.json"), "image_folder": str(tmp_path),
        "model_name_or_path": str(runs["finetune"])})
    trained = build_dataset(config, generator.model, generator.processor)[0]["pixel_values"]
    for given in (tmp_path / "clear.png", Image.open(tmp_path / "clear.png")):
        served = generator.inputs([given], QUESTION)["pixel_values"]
        assert torch.equal(served, trained)
