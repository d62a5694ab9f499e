"""model_factory: tiny LLaVA built from configs, trainability, LoRA and bnb quantization (CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llava_cli.config.run_config import RunConfig  # noqa: E402
from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer  # noqa: E402
from llava_cli.data.text.tokenizer import add_llava_tokens  # noqa: E402
from llava_cli.model.build import build_new_model  # noqa: E402
from llava_cli.model.inputs import image_tokens_per_image  # noqa: E402
from llava_cli.model.load import load_llava, quantization_config  # noqa: E402
from llava_cli.model.lora import apply_lora  # noqa: E402
from llava_cli.model.parts import apply_trainability, components  # noqa: E402

PROMPT = "USER: <image>\nWhat color is the shape? ASSISTANT: red"


def _text_config(vocab: int):
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def _vision_config():
    return transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_demo_tokenizer()
    add_llava_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Folders: config-only LLM/vision, and ones with saved tiny random weights."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    folders = {name: root / name for name in ("llm_cfg", "vit_cfg", "llm", "vit")}
    _text_config(len(tokenizer)).save_pretrained(folders["llm_cfg"])
    _vision_config().save_pretrained(folders["vit_cfg"])
    transformers.LlamaForCausalLM(_text_config(len(tokenizer))).save_pretrained(folders["llm"])
    transformers.CLIPVisionModel(_vision_config()).save_pretrained(folders["vit"])
    return folders


def _config(parts: dict[str, Path], random: bool = False, **kw) -> RunConfig:
    llm, vit = ("llm_cfg", "vit_cfg") if random else ("llm", "vit")
    return RunConfig(model_name_or_path=str(parts[llm]), vision_tower=str(parts[vit]),
                     random_init=random, **kw)


def _batch(processor):
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    batch = processor(images=image, text=PROMPT, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[labels == processor.image_token_id] = -100
    return batch, labels


@pytest.fixture(scope="module")
def built(parts, tokenizer):
    return build_new_model(_config(parts), tokenizer)


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    model, processor = built
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_builds_loads_pretrained_weights_and_runs(built, parts, tokenizer):
    model, processor = built
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)  # exact, no padding
    assert model.config.pad_token_id == tokenizer.pad_token_id
    llm = transformers.LlamaForCausalLM.from_pretrained(parts["llm"])
    vit = transformers.CLIPVisionModel.from_pretrained(parts["vit"])
    got = components(model)
    assert torch.equal(got.llm.layers[1].mlp.down_proj.weight,
                       llm.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(got.lm_head.weight, llm.lm_head.weight)
    assert torch.equal(got.vision_tower.embeddings.patch_embedding.weight,
                       vit.embeddings.patch_embedding.weight)
    batch, labels = _batch(processor)
    count = int((batch["input_ids"] == processor.image_token_id).sum())
    assert count == image_tokens_per_image(model.config) == 16
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)


def test_cls_patch_adds_one_token(parts, tokenizer):
    with pytest.warns(UserWarning, match="RANDOM"):
        model, processor = build_new_model(
            _config(parts, random=True, vision_select_feature="cls_patch"), tokenizer)
    batch, labels = _batch(processor)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 17
    assert image_tokens_per_image(model.config) == 17
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_save_reload_identical(built, saved):
    model, processor = built
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(saved)
    reprocessor = transformers.AutoProcessor.from_pretrained(saved)
    batch, _ = _batch(processor)
    batch2, _ = _batch(reprocessor)
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, reloaded.eval()(**batch2).logits)


def test_missing_weights_is_an_error(parts, tokenizer):
    with pytest.raises(ValueError, match="random_init"):
        build_new_model(_config(parts, random=True).model_copy(update={"random_init": False}),
                        tokenizer)


def test_projector_types(parts, tokenizer):
    with pytest.raises(ValueError, match="exactly two linear layers around one activation"):
        build_new_model(_config(parts, projector_type="mlp3x_gelu"), tokenizer)
    with pytest.raises(ValueError, match="unknown projector_type 'identity'"):
        build_new_model(_config(parts, projector_type="identity"), tokenizer)


def test_a_linear_projector_is_one_linear_layer_in_the_stock_layout(parts, tokenizer, tmp_path):
    """LLaVA's `linear`: linear_1, the identity activation, linear_2 the (frozen) identity —
    the output is exactly one nn.Linear's, and it saves and reloads with stock transformers."""
    model, _ = build_new_model(_config(parts, projector_type="linear"), tokenizer)
    projector = components(model).projector
    assert model.config.projector_hidden_act == "linear"
    features = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(projector(features), torch.nn.functional.linear(
            features, projector.linear_1.weight, projector.linear_1.bias))
    apply_trainability(model, "frozen", "full", "frozen")
    assert _trainable(model) == {"model.multi_modal_projector.linear_1.weight",
                                 "model.multi_modal_projector.linear_1.bias"}
    model.save_pretrained(tmp_path)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(components(again).projector(features), projector(features))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_trainability_pretrain_and_finetune(built):
    model, _ = built
    counts = apply_trainability(model, "frozen", "full", "frozen")
    names = _trainable(model)
    assert names and all(n.startswith("model.multi_modal_projector.") for n in names)
    assert counts["vision_tower"] == counts["llm"] == counts["lm_head"] == 0
    assert counts["projector"] == sum(p.numel() for p in components(model).projector.parameters())
    apply_trainability(model, "frozen", "full", "full")
    names = _trainable(model)
    everything = {n for n, _ in model.named_parameters()}
    assert names == {n for n in everything if not n.startswith("model.vision_tower.")}
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names
    with pytest.raises(ValueError, match="not supported"):
        apply_trainability(model, "lora", "full", "full")


def _assert_lora_layout(peft_model) -> None:
    names = {n for n, _ in peft_model.named_parameters()}
    lora = {n for n in names if "lora_" in n}
    assert lora and all(".language_model.layers." in n for n in lora)
    assert len({n.split(".lora_")[0] for n in lora}) == 14  # 7 linears x 2 layers
    parts = components(peft_model)
    for module in (parts.vision_tower, parts.projector, parts.lm_head):
        assert not any("lora_" in n for n, _ in module.named_parameters())
    assert "multi_modal_projector" in peft_model.peft_config["default"].modules_to_save
    trainable = _trainable(peft_model)
    assert trainable == lora | {n for n in names if "modules_to_save.default" in n}


def test_lora_only_in_language_model(saved):
    config = RunConfig(train_llm="lora", lora_r=4, lora_alpha=8)
    model = load_llava(str(saved), config)
    peft_model = apply_lora(model, config)
    _assert_lora_layout(peft_model)
    counts = apply_trainability(peft_model, "frozen", "full", "lora")
    assert counts["lm_head"] == 0 and counts["llm"] > 0 and counts["vision_tower"] == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_load_lora_step(saved, bits):
    import bitsandbytes as bnb

    config = RunConfig(bits=bits, train_llm="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       training_args={"gradient_checkpointing": bits == 4})
    assert quantization_config(RunConfig()) is None
    model = load_llava(str(saved), config)
    parts = components(model)
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(parts.llm.layers[0].self_attn.q_proj, quant_cls)
    for module in (parts.vision_tower, parts.projector):
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and not any(isinstance(m, quant_cls) for m in linears)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    peft_model = apply_lora(model, config)
    _assert_lora_layout(peft_model)
    processor = transformers.AutoProcessor.from_pretrained(saved)
    batch, labels = _batch(processor)
    peft_model.train()
    assert not peft_model.is_activation_checkpointing  # left to the Trainer, set up once
    if bits == 4:  # as the Trainer does at train start (non-reentrant, our fixed setting)
        peft_model.activation_checkpointing_enable({"use_reentrant": False})
    loss = peft_model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_random_init_warns(parts, tokenizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_new_model(_config(parts, random=True), tokenizer)
    assert any("RANDOM" in str(w.message) for w in caught)


def test_full_clip_folder_with_preprocessor(tmp_path, parts, tokenizer):
    """A two-tower CLIPModel folder works; its preprocessor_config.json is used."""
    torch.manual_seed(1)
    text = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       projection_dim=32)
    clip_config = transformers.CLIPConfig(text_config=text.to_dict(),
                                          vision_config=_vision_config().to_dict(),
                                          projection_dim=32)
    clip = transformers.CLIPModel(clip_config)
    clip.save_pretrained(tmp_path)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
    config = RunConfig(model_name_or_path=str(parts["llm"]), vision_tower=str(tmp_path))
    model, processor = build_new_model(config, tokenizer)
    assert torch.equal(components(model).vision_tower.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
    assert list(processor.image_processor.image_mean) == [0.1, 0.2, 0.3]
    batch, labels = _batch(processor)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_siglip_uses_every_patch(tmp_path, parts, tokenizer):
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4))
    siglip.save_pretrained(tmp_path)
    config = RunConfig(model_name_or_path=str(parts["llm"]), vision_tower=str(tmp_path))
    model, processor = build_new_model(config, tokenizer)
    assert model.config.vision_feature_select_strategy == "full"  # no CLS to drop
    assert torch.equal(components(model).vision_tower.embeddings.patch_embedding.weight,
                       siglip.embeddings.patch_embedding.weight)
    assert image_tokens_per_image(model.config) == 16
    batch, labels = _batch(processor)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
    assert torch.isfinite(model(**batch, labels=labels).loss)


def test_anyres_builds_llava_next(tmp_path, parts, tokenizer):
    config = _config(parts, random=True, image_aspect_ratio="anyres")
    with pytest.warns(UserWarning, match="RANDOM"):
        model, processor = build_new_model(config, tokenizer)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert model.config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]
    batch, labels = _batch(processor)
    assert torch.isfinite(model(**batch, labels=labels).loss)
    counts = apply_trainability(model, "frozen", "full", "frozen")
    assert _trainable(model) == {n for n, _ in model.named_parameters()
                                 if "multi_modal_projector" in n or n.endswith("image_newline")}
    assert counts["projector"] == sum(p.numel() for n, p in model.named_parameters()
                                      if n in _trainable(model))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path)
    batch2, _ = _batch(transformers.AutoProcessor.from_pretrained(tmp_path))
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, reloaded.eval()(**batch2).logits)
    with pytest.raises(ValueError, match="depends on the image"):
        image_tokens_per_image(model.config)


def test_new_parts_start_as_llava_and_a_random_tower_can_locate(parts, tokenizer, built):
    """Projector: PyTorch's default Linear init (LLaVA's), not transformers' normal(0, 0.02);
    random-init towers: position embeddings of std 1. Loaded towers keep their weights."""
    import math

    model, _ = built
    layer = components(model).projector.linear_1
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=√5) == U(-1/√fan_in, ...)
    assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.5 * bound / math.sqrt(3)
    def position(module):
        return next(v for k, v in module.state_dict().items()
                    if k.endswith("position_embedding.weight"))

    loaded = transformers.CLIPVisionModel.from_pretrained(parts["vit"])
    assert torch.equal(position(components(model).vision_tower), position(loaded))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        random_model, _ = build_new_model(_config(parts, random=True), tokenizer)
    assert 0.8 < position(components(random_model).vision_tower).std() < 1.2
