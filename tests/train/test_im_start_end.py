"""`mm_use_im_start_end` for real on tiny models: the two tokens added with the original's
mean rows, stage 1 training the projector and the input embeddings (as the original's
`tune_mm_mlp_adapter`), its trained rows reaching stage 2 through projector.safetensors, and
the output served by stock transformers with exactly training's ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from llava_cli.artifacts.projector_file import EMBEDDINGS_KEY, read_projector_parts
from llava_cli.data.text.tokenizer import check_image_markers, marker_ids
from llava_cli.model.inputs import input_spec_of, sample_builder
from llava_cli.model.start import load_starting_model
from tests.helpers import demo_run_config as _config
from tests.helpers import demo_sample
from tests.helpers import logged_losses as _losses
from tests.helpers import start_state as _start_state

RECORDS, _ = demo_sample()
EMBED = "model.language_model.embed_tokens.weight"
FLAG = {"mm_use_im_start_end": True}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.helpers import TINY_LLM, TINY_VISION

    out = tmp_path_factory.mktemp("runs") / "pretrain"
    # v1, not plain: the original's `plain` writes the bare <image> (no marker to train)
    config = _config("pretrain", out, model_name_or_path=str(TINY_LLM),
                     vision_tower=str(TINY_VISION), tokenizer="demo", random_init=True,
                     template="v1", max_steps=4, **FLAG)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        before = _start_state(config)
        from llava_cli.train.run import run_training

        result = run_training(config)
    return result, before


def test_stage_1_trains_the_projector_and_the_input_embeddings(pretrained):
    result, before = pretrained
    model = result.trainer.model
    tokenizer = result.trainer.processing_class.tokenizer
    start, end = ids = marker_ids(tokenizer)
    assert ids == [len(tokenizer) - 2, len(tokenizer) - 1]  # added last, as the original
    # The new rows start as the original's: the mean of the rows before them.
    for key in (EMBED, "lm_head.weight"):
        mean = before[key][:start].mean(dim=0)
        assert torch.allclose(before[key][start], mean) and torch.allclose(before[key][end], mean)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {EMBED} | {f"model.multi_modal_projector.linear_{i}.{p}"
                                 for i in (1, 2) for p in ("weight", "bias")}
    # The whole matrix trains, as the original's; a row changes where its token was in a
    # prompt (the markers among them), the others get no gradient (AdamW, no weight decay).
    rows = (before[EMBED] != after[EMBED]).any(dim=1).nonzero().flatten().tolist()
    dataset = result.trainer.train_dataset
    seen = {t for i in range(len(dataset)) for t in _ids(dataset[i])}
    assert start in rows and end in rows and set(rows) <= seen
    assert tokenizer.convert_tokens_to_ids("<image>") not in rows  # replaced by the features
    assert _losses(result.output_dir)[-1] < _losses(result.output_dir)[0]
    # Saved beside the projector, under the original's mm_projector.bin name, and in the
    # checkpoints too (resume restores the whole matrix).
    saved = read_projector_parts(result.output_dir / "projector.safetensors")
    assert torch.equal(saved.embeddings, after[EMBED])
    assert read_projector_parts(result.output_dir / "checkpoint-4" / "projector.safetensors"
                                ).embeddings is not None
    manifest = json.loads((result.output_dir / "llava_run.json").read_text())
    assert manifest["kind"] == "projector"
    with open(result.output_dir / "projector.safetensors", "rb") as file:
        assert EMBEDDINGS_KEY.encode() in file.read(4096)


def _ids(item) -> list[int]:
    return torch.as_tensor(item["input_ids"]).flatten().tolist()


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    from llava_cli.train.run import run_training

    out = tmp_path_factory.mktemp("runs") / "finetune"
    config = _config("finetune", out, model_name_or_path=str(pretrained[0].output_dir),
                     max_steps=2, **FLAG)
    before = _start_state(config)
    return run_training(config), before, config


def test_stage_2_starts_from_the_trained_rows_and_serves_as_trained(pretrained, finetuned):
    result, before, config = finetuned
    trained = pretrained[0].trainer.model.state_dict()[EMBED]
    ids = marker_ids(result.trainer.processing_class.tokenizer)
    assert torch.equal(before[EMBED][ids], trained[ids])
    # Stock transformers: AutoProcessor + apply_chat_template + LlavaProcessor give exactly
    # the ids training built for the same record.
    record = json.loads(Path(RECORDS).read_text())[1]  # an image, two rounds
    model = result.trainer.model
    sample = sample_builder(config, input_spec_of(model, result.trainer.processing_class)
                            ).build(record)
    processor = transformers.AutoProcessor.from_pretrained(result.output_dir)
    roles = {"human": "user", "gpt": "assistant"}
    messages = [{"role": roles[t["from"]], "content": t["value"]}
                for t in record["conversations"]]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text.count("<im_start><image><im_end>") == 1
    image = Image.open(Path(config.image_folder) / record["image"]).convert("RGB")
    served = processor(text=text, images=[image], return_tensors="pt")["input_ids"][0].tolist()
    assert served == sample.encoded.input_ids
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(result.output_dir)
    assert torch.equal(reloaded.get_input_embeddings().weight,
                       model.get_input_embeddings().weight)


def test_the_markers_must_match_the_starting_model(pretrained, tmp_path):
    source = str(pretrained[0].output_dir)
    without = _config("finetune", tmp_path / "a", model_name_or_path=source)
    with pytest.raises(ValueError, match="was trained with <im_start>/<im_end> around each "
                       "image .mm_use_im_start_end.; pass --set mm_use_im_start_end=true"):
        load_starting_model(without)
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    with pytest.raises(ValueError, match="mm_use_im_start_end: the starting model 'x' has no "
                       "<im_start>/<im_end> tokens"):
        check_image_markers(build_demo_tokenizer(), True, "the starting model 'x'")
