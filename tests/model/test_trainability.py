"""Trainability declared in one place: lm_head apart from the decoder (the original's
`freeze_backbone`), and vision-tower parts (position embedding, last N layers; InternVL's
`tune_vit_pos_embedding`), applied by `apply_trainability` alone — with and without LoRA."""

from __future__ import annotations

import pytest
import torch
import transformers

from llava_cli.artifacts.manifest import OutputKind
from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import RunConfig
from llava_cli.model.parts import apply_trainability
from tests.helpers import TINY_LLM, TINY_VISION

IMAGE_ID, TOKENS_PER_IMAGE = 599, 16
TOWER = "model.vision_tower."
POSITION = TOWER + "embeddings.position_embedding.weight"


def _llava(feature_layer: int = -2) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config=transformers.AutoConfig.from_pretrained(TINY_VISION),
        text_config=transformers.AutoConfig.from_pretrained(TINY_LLM), image_token_id=IMAGE_ID,
        vision_feature_layer=feature_layer, vision_feature_select_strategy="default",
        image_seq_length=TOKENS_PER_IMAGE)
    return transformers.LlavaForConditionalGeneration(config)


def _batch() -> dict[str, torch.Tensor]:
    text = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([torch.tensor([[1] + [IMAGE_ID] * TOKENS_PER_IMAGE]), text], dim=1)
    labels = ids.clone()
    labels[:, :TOKENS_PER_IMAGE + 1] = -100
    return {"input_ids": ids, "labels": labels,
            "pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _changed_by_a_step(model) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # LoRA's B starts at zero: everything moves by the second step
        model(**_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def test_freeze_backbone_freezes_the_decoder_and_trains_lm_head_as_the_original():
    """The original: `model.model.requires_grad_(False)` — embeddings, layers and norm
    frozen, lm_head (outside `model.model`) still trained; the projector, made after, too."""
    config = resolve_config("finetune", flags={"freeze_backbone": True})
    assert (config.train_llm, config.train_lm_head, config.train_projector) == (
        "frozen", "full", "full")
    assert config.output_kind == OutputKind.FULL  # lm_head changed: a full checkpoint
    model = _llava()
    counts = apply_trainability(model, config.train_vision_tower, config.train_projector,
                                config.train_llm, config.train_lm_head)
    assert counts["llm"] == 0 and counts["lm_head"] == model.lm_head.weight.numel()
    changed = _changed_by_a_step(model)
    assert changed == {"lm_head.weight"} | {n for n in _trainable(model)
                                            if n.startswith("model.multi_modal_projector.")}
    # --freeze-llm (ours) still freezes the head with the decoder, as stage 1 does
    assert resolve_config("finetune", flags={"train_llm": "frozen"}).output_kind == \
        OutputKind.PROJECTOR


def test_pretrain_is_square_as_llava_1_5_stage_1_and_finetune_pads():
    assert resolve_config("pretrain").image_aspect_ratio == "square"
    assert resolve_config("finetune").image_aspect_ratio == "pad"
    assert resolve_config("lora").image_aspect_ratio == "pad"


def test_the_position_embedding_alone_trains_and_tune_vit_pos_embedding_means_it():
    config = resolve_config("finetune", flags={"tune_vit_pos_embedding": True})
    assert config.train_vision_tower == "position_embedding"
    assert config.output_kind == OutputKind.FULL
    model = _llava()
    apply_trainability(model, "position_embedding", "frozen", "frozen")
    assert _trainable(model) == {POSITION}
    assert _changed_by_a_step(model) == {POSITION}


@pytest.mark.parametrize(("feature_layer", "spec", "layers"), [
    (-2, "last_1_layers", [0]),  # layer 1's output is never read at -2
    (-1, "last_2_layers", [0, 1]),
    (-1, "position_embedding+last_1_layers", [1]),
])
def test_the_last_layers_are_those_that_feed_the_projector(feature_layer, spec, layers):
    model = _llava(feature_layer)
    apply_trainability(model, spec, "frozen", "frozen")
    expected = {n for n, _ in model.named_parameters()
                if any(n.startswith(f"{TOWER}encoder.layers.{i}.") for i in layers)}
    if "position_embedding" in spec:
        expected.add(POSITION)
    assert _trainable(model) == expected
    assert _changed_by_a_step(model) == expected


def test_tower_parts_that_cannot_be_are_one_line_errors():
    with pytest.raises(ValueError, match="only 1 encoder layers feed the projector"):
        apply_trainability(_llava(-2), "last_2_layers", "full", "full")
    for bad in ("last_0_layers", "position", "position_embedding+position_embedding",
                "pos_embedding"):
        with pytest.raises(ValueError, match="is not a tower part; give frozen, full, or"):
            RunConfig(train_vision_tower=bad)
    with pytest.raises(ValueError, match="not a tower part"):
        resolve_config("finetune", sets=["train_vision_tower=last_two_layers"])


def test_tower_parts_and_lm_head_next_to_lora_train_the_saved_copies():
    pytest.importorskip("peft")
    from llava_cli.model.lora import apply_lora

    config = RunConfig(train_llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       train_vision_tower="position_embedding", train_projector="frozen",
                       train_lm_head="full")
    peft_model = apply_lora(_llava(), config)
    assert set(peft_model.peft_config["default"].modules_to_save) == {"vision_tower",
                                                                       "lm_head"}
    copy = "base_model.model.model.vision_tower.modules_to_save.default."
    non_lora = {n for n in _trainable(peft_model) if "lora_" not in n}
    assert non_lora == {copy + "embeddings.position_embedding.weight",
                        "base_model.model.lm_head.modules_to_save.default.weight"}
    changed = _changed_by_a_step(peft_model)
    assert changed == _trainable(peft_model)  # and nothing else moved


@pytest.mark.parametrize(("flags", "embeddings"), [
    ({"tune_mm_mlp_adapter": True}, True),  # the original's stage 1: they train
    ({}, True),  # a finetune trains the LLM, embeddings included, anyway
    ({"freeze_backbone": True}, False),  # no tune_mm_mlp_adapter: the original freezes them
    ({"freeze_mm_mlp_adapter": True, "freeze_llm": True}, False)])
def test_im_start_end_trains_the_input_embeddings_as_the_original(flags, embeddings):
    config = resolve_config("finetune", flags={**flags, "mm_use_im_start_end": True})
    model = _llava()
    apply_trainability(model, config.train_vision_tower, config.train_projector,
                       config.train_llm, config.train_lm_head, config.mm_use_im_start_end)
    embed = "model.language_model.embed_tokens.weight"
    assert (embed in _trainable(model)) == embeddings
    if flags == {"tune_mm_mlp_adapter": True}:
        assert _trainable(model) == {embed} | {n for n, _ in model.named_parameters()
                                               if "multi_modal_projector" in n}
        assert config.output_kind == OutputKind.PROJECTOR
