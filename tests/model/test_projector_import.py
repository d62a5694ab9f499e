"""Projector files the original code and its forks write: the original's `mm_projector.bin`,
and the one a `tune_vit_pos_embedding` run writes with the vision tower's position embedding
in it, which goes into the tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from llava_cli.artifacts.export import export_projector
from llava_cli.artifacts.projector_file import read_projector_file
from llava_cli.model.parts import components
from llava_cli.model.projector import load_projector_weights

# Where the fork's trainer finds it: `model.get_model().vision_tower.named_parameters()`
# under LLaVA's CLIPVisionTower wrapper, saved with the projector by its full name.
POSITION_KEY = "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"


@pytest.fixture(scope="module")
def original_llava(assets: Path) -> Path:
    """The original LLaVA's tiny configs and its stage-1 projector file (../shared)."""
    return assets / "original-llava"


def _model(original_llava: Path) -> transformers.LlavaForConditionalGeneration:
    config = transformers.LlavaConfig(
        vision_config=transformers.AutoConfig.from_pretrained(original_llava / "tiny-clip"),
        text_config=transformers.AutoConfig.from_pretrained(original_llava / "tiny-vicuna"),
        image_token_id=31999)
    return transformers.LlavaForConditionalGeneration(config)


@pytest.fixture
def with_position(tmp_path, original_llava):
    original = torch.load(original_llava / "projector" / "mm_projector.bin", weights_only=True)
    position = torch.randn(50, 64, generator=torch.Generator().manual_seed(3))  # 7² + CLS
    file = tmp_path / "mm_projector.bin"
    torch.save({**original, POSITION_KEY: position}, file)
    return file, original, position


def test_the_position_embedding_beside_the_projector_goes_into_the_tower(
        with_position, original_llava):
    file, original, position = with_position
    model = _model(original_llava)
    load_projector_weights(model, file)
    parts = components(model)
    assert torch.equal(parts.vision_tower.embeddings.position_embedding.weight, position)
    projector = parts.projector.state_dict()
    assert torch.equal(projector["linear_1.weight"], original["model.mm_projector.0.weight"])
    assert torch.equal(projector["linear_2.bias"], original["model.mm_projector.2.bias"])


def test_a_position_embedding_that_does_not_fit_the_tower_is_refused(
        with_position, tmp_path, original_llava):
    file, original, _ = with_position
    wrong = tmp_path / "wrong.bin"
    torch.save({**original, POSITION_KEY: torch.zeros(577, 64)}, wrong)
    with pytest.raises(ValueError, match=r"position embedding has shape \(577, 64\) but this "
                                         r"vision tower's is \(50, 64\)"):
        load_projector_weights(_model(original_llava), wrong)


def test_reading_only_the_projector_of_such_a_file_says_where_it_loads(
        with_position, tmp_path, original_llava):
    file, _, _ = with_position
    with pytest.raises(ValueError, match="position embedding beside the projector"):
        read_projector_file(file)
    with pytest.raises(ValueError, match="--pretrained-projector"):
        export_projector(file, tmp_path / "out.safetensors")
    assert set(read_projector_file(original_llava / "projector" / "mm_projector.bin")) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}


def test_the_original_linear_projector_imports_exactly_and_exports_back(tmp_path, original_llava):
    """The original's `linear` mm_projector.bin (keys `model.mm_projector.weight/bias`) in a
    single-linear model: identical outputs; export-projector writes the same two keys back."""
    generator = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(128, 64, generator=generator), torch.randn(128, generator=generator)
    file = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.weight": weight, "model.mm_projector.bias": bias}, file)
    model = _model(original_llava)
    model.config.projector_hidden_act = "linear"
    model = transformers.LlavaForConditionalGeneration(model.config)
    load_projector_weights(model, file)
    features = torch.randn(5, 64, generator=generator)
    with torch.no_grad():
        assert torch.equal(components(model).projector(features),
                           torch.nn.functional.linear(features, weight, bias))
    model.save_pretrained(tmp_path / "model")
    export_projector(tmp_path / "model", tmp_path / "back.bin")
    back = torch.load(tmp_path / "back.bin", weights_only=True)
    assert set(back) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    assert torch.equal(back["model.mm_projector.weight"], weight)
    with pytest.raises(ValueError, match="a `linear` projector .* build the model with "
                                         "projector_type linear"):
        load_projector_weights(_model(original_llava), file)


def test_a_two_layer_projector_file_is_refused_by_a_linear_model(tmp_path, original_llava):
    """Its shapes fit (linear_2 is square) but the linear model has no activation between the
    layers and never trains linear_2: loading it would compute the file's MLP wrongly."""
    generator = torch.Generator().manual_seed(5)
    file = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.randn(128, 64, generator=generator),
                "model.mm_projector.0.bias": torch.randn(128, generator=generator),
                "model.mm_projector.2.weight": torch.randn(128, 128, generator=generator),
                "model.mm_projector.2.bias": torch.randn(128, generator=generator)}, file)
    model = _model(original_llava)
    model.config.projector_hidden_act = "linear"
    model = transformers.LlavaForConditionalGeneration(model.config)
    with pytest.raises(ValueError, match=r"a two-layer \(mlp2x_gelu\) projector but this "
                                         "model's projector is `linear`"):
        load_projector_weights(model, file)


def test_the_input_embeddings_beside_the_projector_give_the_marker_rows(tmp_path, original_llava):
    """The original's stage 1 with `mm_use_im_start_end` saves `model.embed_tokens.weight`
    (its whole matrix, the two markers last) into mm_projector.bin; stage 2 takes those rows."""
    original = torch.load(original_llava / "projector" / "mm_projector.bin", weights_only=True)
    model = _model(original_llava)
    embedding = model.get_input_embeddings().weight
    saved = torch.randn(embedding.shape[0] - 3, embedding.shape[1])  # its vocabulary, not ours
    file = tmp_path / "mm_projector.bin"
    torch.save({**original, "model.embed_tokens.weight": saved}, file)
    before = embedding.detach().clone()
    rows = [5, 9]
    load_projector_weights(model, file, rows)
    assert torch.equal(embedding[rows], saved[-2:])
    others = [i for i in range(len(before)) if i not in rows]
    assert torch.equal(embedding[others], before[others])
    with pytest.raises(ValueError, match="holds the input embeddings of an mm_use_im_start_end "
                       "run beside the projector; pass --set mm_use_im_start_end=true"):
        load_projector_weights(model, file)
    with pytest.raises(ValueError, match="holds the input embeddings beside the projector"):
        read_projector_file(file)
    with pytest.raises(ValueError, match="holds no input embeddings, so the <im_start>/<im_end>"):
        load_projector_weights(model, original_llava / "projector" / "mm_projector.bin", rows)
    # Resuming a stage-1 checkpoint (ours: the whole matrix of this model) restores every row.
    whole = torch.randn(embedding.shape)
    torch.save({**original, "model.embed_tokens.weight": whole}, file)
    load_projector_weights(model, file, "all")
    assert torch.equal(embedding, whole)
