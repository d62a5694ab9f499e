"""model.load: weights are loaded strictly. A folder whose weight files are gone, damaged, or
lack (or add, or reshape) a key of the LLM, vision tower or projector is a one-line error
naming the folder, the component and the key — never a model with random weights in it. Keys
that are legitimately absent (tied lm_head, position_ids buffers, the text half of a full
CLIPModel used as vision tower, the transformers-4 layout) still load."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from llava_cli.config.run_config import RunConfig  # noqa: E402
from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer  # noqa: E402
from llava_cli.data.text.tokenizer import add_llava_tokens  # noqa: E402
from llava_cli.model.build import build_new_model  # noqa: E402
from llava_cli.model.load import TWO_TOWER_EXTRAS, WeightsError, load_llava  # noqa: E402
from llava_cli.model.parts import components  # noqa: E402
from llava_cli.model.projector import load_projector_weights  # noqa: E402

WEIGHTS = "model.safetensors"


def _text_config(tie: bool = False):
    return transformers.LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)


def _vision_config():
    return transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4)


def _rewrite(folder: Path, change) -> None:
    """Rewrite the folder's safetensors file with `change(state)` applied."""
    state = load_file(folder / WEIGHTS)
    save_file(change(state), folder / WEIGHTS, metadata={"format": "pt"})


def _without(*keys: str):
    return lambda state: {k: v for k, v in state.items() if k not in keys}


def _with(key: str, tensor):
    return lambda state: {**state, key: tensor}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaVA saved as transformers saves it (legacy key layout on disk)."""
    folder = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=_vision_config(), text_config=_text_config(),
        image_token_id=119)).save_pretrained(folder)
    return folder


@pytest.fixture()
def damaged(checkpoint, tmp_path) -> Path:
    """A copy of the checkpoint, for a test to damage."""
    import shutil

    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


def _load(folder: Path, **settings):
    return load_llava(str(folder), RunConfig(**settings), for_training=False)


def test_a_complete_checkpoint_loads(checkpoint):
    model = _load(checkpoint)
    assert torch.equal(components(model).projector.linear_1.weight,
                       load_file(checkpoint / WEIGHTS)["multi_modal_projector.linear_1.weight"])


@pytest.mark.parametrize(("key", "component", "loaded_as"), [
    ("language_model.model.layers.0.mlp.up_proj.weight", "LLM",
     "model.language_model.layers.0.mlp.up_proj.weight"),
    ("language_model.lm_head.weight", "LLM", "lm_head.weight"),
    ("vision_tower.encoder.layers.1.mlp.fc1.weight", "vision tower",
     "model.vision_tower.encoder.layers.1.mlp.fc1.weight"),
    ("multi_modal_projector.linear_2.bias", "projector",
     "model.multi_modal_projector.linear_2.bias"),
])
def test_a_missing_key_names_its_component(damaged, key, component, loaded_as):
    _rewrite(damaged, _without(key))
    with pytest.raises(WeightsError, match=rf"^LLaVA model '{damaged}': .*\({component}: 1 "
                                           rf"missing \({loaded_as}\)\); .*restore"):
        _load(damaged)


def test_unexpected_and_reshaped_keys_are_errors(damaged):
    _rewrite(damaged, _with("multi_modal_projector.linear_3.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"projector: 1 unexpected "
                                           r"\(model.multi_modal_projector.linear_3.weight\)"):
        _load(damaged)
    _rewrite(damaged, _without("multi_modal_projector.linear_3.weight"))
    _rewrite(damaged, _with("multi_modal_projector.linear_2.weight", torch.zeros(5, 5)))
    with pytest.raises(WeightsError, match=r"projector: 1 with another shape \(.*linear_2.weight "
                                           r"\(5, 5\) in the file, \(64, 64\) in the model"):
        _load(damaged)


def test_many_missing_keys_are_counted_and_a_few_named(damaged):
    _rewrite(damaged, lambda state: {k: v for k, v in state.items()
                                     if not k.startswith("language_model.model.layers.1.")})
    with pytest.raises(WeightsError, match=r"LLM: 9 missing \(model\.language_model\.layers\.1"
                                           r"\.[^)]*, … 6 more\)") as caught:
        _load(damaged)
    assert "\n" not in str(caught.value)


def test_no_weights_a_missing_shard_or_a_damaged_file_are_errors(damaged, tmp_path):
    (damaged / WEIGHTS).write_bytes((damaged / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(WeightsError, match=rf"'{damaged}': its weights could not be loaded "
                                           r"\(.*\); restore"):
        _load(damaged)
    (damaged / WEIGHTS).unlink()  # config.json alone
    with pytest.raises(WeightsError, match=r"could not be loaded \(.*no file named"):
        _load(damaged)
    sharded = tmp_path / "sharded"
    transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=_vision_config(), text_config=_text_config(),
        image_token_id=119)).save_pretrained(sharded, max_shard_size="100KB")
    sorted(sharded.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(WeightsError, match="could not be loaded"):
        _load(sharded)


def test_a_quantized_load_is_strict_too(damaged):
    pytest.importorskip("bitsandbytes")
    _rewrite(damaged, _without("language_model.model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(WeightsError, match=r"LLM: 1 missing \(model.language_model.layers.1."
                                           r"self_attn.q_proj.weight\)"):
        _load(damaged, bits=4, train_llm="lora")


def test_the_transformers_4_layout_still_loads(damaged):
    """llava-hf checkpoints saved by transformers 4 (`vision_tower.vision_model.*`): renamed
    on load by transformers' conversions, so nothing is missing."""
    _rewrite(damaged, lambda state: {
        k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()})
    _load(damaged)


def test_a_tied_lm_head_is_not_missing(tmp_path):
    folder = tmp_path / "tied"
    transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=_vision_config(), text_config=_text_config(tie=True), image_token_id=119,
        tie_word_embeddings=True)).save_pretrained(folder)
    assert not [k for k in load_file(folder / WEIGHTS) if "lm_head" in k]
    model = _load(folder)
    assert model.lm_head.weight is model.get_input_embeddings().weight


# Parts: a new model from an LLM folder and a vision tower folder.


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_demo_tokenizer()
    add_llava_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(_text_config()).save_pretrained(root / "llm")
    transformers.LlamaForCausalLM(_text_config(tie=True)).save_pretrained(root / "tied")
    transformers.CLIPVisionModel(_vision_config()).save_pretrained(root / "vit")
    text = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4)
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=_vision_config().to_dict(),
        projection_dim=32)).save_pretrained(root / "clip")
    return {name: root / name for name in ("llm", "tied", "vit", "clip")}


def _copy(parts: dict[str, Path], name: str, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(parts[name], tmp_path / name))


def _build(llm: Path, vision: Path, tokenizer):
    return build_new_model(RunConfig(model_name_or_path=str(llm), vision_tower=str(vision)),
                           tokenizer)


def test_parts_load_tied_llm_and_full_clip(parts, tokenizer):
    """A tied LLM has no lm_head on disk; a full CLIPModel (as the real CLIP-L/336 is) has
    a text model, projections and logit_scale beside its vision model: all fine."""
    model, _ = _build(parts["tied"], parts["clip"], tokenizer)
    clip = transformers.CLIPModel.from_pretrained(parts["clip"])
    assert torch.equal(components(model).vision_tower.encoder.layers[1].mlp.fc1.weight,
                       clip.vision_model.encoder.layers[1].mlp.fc1.weight)
    assert {"text_model.", "logit_scale"} <= set(TWO_TOWER_EXTRAS)


def test_a_part_missing_a_key_is_an_error(parts, tokenizer, tmp_path):
    llm = _copy(parts, "llm", tmp_path)
    _rewrite(llm, _without("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightsError, match=rf"^LLM '{llm}': .*\(LLM: 1 missing \(model.layers.1."
                                           r"self_attn.k_proj.weight\)\).*random_init: true"):
        _build(llm, parts["vit"], tokenizer)
    clip = _copy(parts, "clip", tmp_path)
    _rewrite(clip, _without("vision_model.encoder.layers.0.mlp.fc2.bias"))
    with pytest.raises(WeightsError, match=r"^vision tower .*\(vision tower: 1 missing "
                                           r"\(encoder.layers.0.mlp.fc2.bias\)\)"):
        _build(parts["llm"], clip, tokenizer)


def test_an_unexpected_vision_key_is_an_error_but_not_the_text_tower(parts, tokenizer,
                                                                     tmp_path):
    vit = _copy(parts, "vit", tmp_path)
    _rewrite(vit, _with("text_model.final_layer_norm.weight", torch.ones(32)))
    _build(parts["llm"], vit, tokenizer)  # a vision-only file with a text key: not used
    _rewrite(vit, _with("encoder.layers.2.mlp.fc1.weight", torch.ones(2)))
    with pytest.raises(WeightsError, match=r"vision tower: 1 unexpected \(encoder.layers.2."):
        _build(parts["llm"], vit, tokenizer)


def test_a_config_only_part_says_how_to_train_from_random_weights(tmp_path, tokenizer, parts):
    _text_config().save_pretrained(tmp_path / "config-only")
    with pytest.raises(WeightsError, match=r"^LLM .*could not be loaded.*random_init: true"):
        _build(tmp_path / "config-only", parts["vit"], tokenizer)


# Projector files (`--pretrained-projector`): strict already, checked here.


@pytest.fixture()
def model(checkpoint):
    return transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint)


def _projector_file(tmp_path: Path, change) -> Path:
    state = {f"multi_modal_projector.{k}": v.clone()
             for k, v in {"linear_1.weight": torch.randn(64, 32), "linear_1.bias": torch.randn(64),
                          "linear_2.weight": torch.randn(64, 64),
                          "linear_2.bias": torch.randn(64)}.items()}
    file = tmp_path / "projector.safetensors"
    save_file(change(state), file)
    return file


def test_a_projector_file_loads_exactly(model, tmp_path):
    file = _projector_file(tmp_path, lambda state: state)
    load_projector_weights(model, file)
    assert torch.equal(components(model).projector.linear_2.bias,
                       load_file(file)["multi_modal_projector.linear_2.bias"])


@pytest.mark.parametrize(("change", "message"), [
    (_without("multi_modal_projector.linear_2.bias"), r"missing \['linear_2.bias'\]"),
    (_with("multi_modal_projector.linear_3.weight", torch.zeros(1)),
     r"unexpected \['linear_3.weight'\]"),
    (_with("multi_modal_projector.linear_1.weight", torch.zeros(64, 16)),
     r"linear_1.weight has shape \(64, 16\) but this model needs \(64, 32\)"),
])
def test_a_projector_file_that_does_not_fit_is_an_error(model, tmp_path, change, message):
    before = components(model).projector.linear_1.weight.clone()
    with pytest.raises(ValueError, match=message):
        load_projector_weights(model, _projector_file(tmp_path, change))
    assert torch.equal(components(model).projector.linear_1.weight, before)


def test_a_whole_checkpoint_given_as_projector_file_is_a_short_error(model, checkpoint):
    with pytest.raises(ValueError, match=r"projector keys do not match .* …\); pass a "
                                         "projector file") as caught:
        load_projector_weights(model, checkpoint / WEIGHTS)
    assert len(str(caught.value)) < 600
