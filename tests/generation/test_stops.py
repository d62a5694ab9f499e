"""Stock generation stops at the end of a turn: every saved model's generation_config carries
its template's stop (EOS ids for one-token stops, `stop_strings` otherwise), so stock
`generate` — and vLLM, which reads the same file — ends where training taught it to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llava_cli.config.resolve import resolve_config  # noqa: E402
from llava_cli.data.text.templates import TEMPLATES  # noqa: E402
from llava_cli.inspect.inspection import demo_data  # noqa: E402
from llava_cli.train.run import run_training  # noqa: E402
from tests.helpers import TINY_LLM, TINY_VISION  # noqa: E402

CHAT_TEMPLATES = [name for name in TEMPLATES if name != "plain"]  # plain: stage 1, no model
REPLY, AFTER = " red", " and then the next turn goes on"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """One finetune step per template on a tiny LLaVA (the user's path: a saved output)."""
    root = tmp_path_factory.mktemp("stops")
    records, images = demo_data()
    runs = {}
    for template in CHAT_TEMPLATES:
        with pytest.warns(UserWarning, match="RANDOM"):
            runs[template] = run_training(resolve_config("finetune", flags={
                "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
                "tokenizer": "demo", "random_init": True, "template": template,
                "data_path": records, "image_folder": images, "max_steps": 1,
                "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
                "output_dir": str(root / template)})).output_dir
    return runs


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_stock_generate_stops_at_the_end_of_the_turn(outputs, template):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(outputs[template]).eval()
    processor = transformers.AutoProcessor.from_pretrained(outputs[template])
    tokenizer, stop = processor.tokenizer, TEMPLATES[template].stop
    saved = json.loads((outputs[template] / "generation_config.json").read_text())
    stop_ids = tokenizer.encode(stop, add_special_tokens=False)
    if len(stop_ids) == 1:
        eos = saved["eos_token_id"]
        assert stop_ids[0] in (eos if isinstance(eos, list) else [eos])
    else:
        assert saved["stop_strings"] == [stop]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "What color is it?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    # The model is made to say REPLY, then the stop, then more; generation must end at the stop.
    script = tokenizer.encode(REPLY + stop + AFTER, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=len(script) + 4, do_sample=False,
                             tokenizer=tokenizer, prefix_allowed_tokens_fn=lambda _, ids: [
                                 script[min(len(ids) - start, len(script) - 1)]])
    text = tokenizer.decode(out[0, start:])
    assert text.startswith(REPLY.strip()) or text.startswith(REPLY), text
    assert text.endswith(stop), (template, text)
    assert AFTER.strip() not in text


def test_our_generator_answers_with_a_stop_string_config(outputs):
    from llava_cli.generation.answering_model import load_for_generation

    generator = load_for_generation(outputs["vicuna_v0"])  # "###": saved as stop_strings
    assert isinstance(generator.answer(None, "Hello!", max_new_tokens=3), str)


def test_an_earlier_stages_stop_does_not_end_this_ones_turns():
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
    from llava_cli.data.text.stops import set_generation_stops

    tokenizer = build_demo_tokenizer()
    newline = tokenizer.encode("\n", add_special_tokens=False)
    config = transformers.GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    set_generation_stops(config, tokenizer, "plain")  # pretrain: a caption ends at "\n"
    assert config.eos_token_id == [tokenizer.eos_token_id, *newline]
    set_generation_stops(config, tokenizer, "v1")  # finetune from it: "</s>" only
    assert config.eos_token_id == tokenizer.eos_token_id


def test_a_template_alias_stops_where_its_template_does():
    from llava_cli.answers.generator import clean_answer
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
    from llava_cli.data.text.stops import template_stop

    tokenizer = build_demo_tokenizer()
    assert template_stop(tokenizer, "vicuna_v1") == template_stop(tokenizer, "v1")
    assert template_stop(tokenizer, "vicuna_v1")[0]  # v1 has a stop (</s>)
    assert clean_answer(" red</s>more", "vicuna_v1") == "red"
