"""Building a new LLaVA from a causal LM and a CLIP/SigLIP tower (transformers' own classes).

The model is always `LlavaForConditionalGeneration` (`LlavaNext…` for anyres), so what we save
loads with stock transformers and vLLM. Heavy imports stay inside the functions.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

from llava_cli.data.text.tokenizer import IMAGE_TOKEN, marker_ids
from llava_cli.model.load import RESTORE, TWO_TOWER_EXTRAS, load_pretrained, torch_dtype
from llava_cli.model.partitioned import copy_weights, gathered
from llava_cli.model.parts import components, is_single_linear
from llava_cli.model.vision import (
    build_processor,
    check_feature_layer,
    select_strategy,
    tower_positions,
    vision_config_of,
    vision_model_class,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llava_cli.config.run_config import RunConfig

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")
PARTS_REMEDY = (f"{RESTORE}, or set random_init: true to train from random weights (for "
                "tests only)")


def _projector_act(projector_type: str) -> str:
    """The stock projector's activation for a LLaVA projector type.

    transformers' projector is always linear_1 → activation → linear_2. `mlp2x_gelu` is that
    with GELU. LLaVA's `linear` (one nn.Linear) is that exactly with the identity activation
    and linear_2 the identity matrix (zero bias), which stays frozen (`model.parts`): same
    outputs, same trained weights. Three or more linears cannot be written in it."""
    match = _MLP_RE.match(projector_type)
    if projector_type == "linear":
        return "linear"
    if match and int(match.group(1)) == 2:
        return "gelu"
    if match and int(match.group(1)) >= 3:
        raise ValueError(
            f"projector_type {projector_type!r}: transformers' LLaVA projector has exactly two "
            "linear layers around one activation, so a deeper MLP would need a custom class "
            "that stock transformers and vLLM cannot load; use mlp2x_gelu or linear")
    raise ValueError(f"unknown projector_type {projector_type!r}; use mlp2x_gelu or linear")


def build_new_model(config: RunConfig, tokenizer: Any) -> tuple[Any, Any]:
    """A new LLaVA from a causal-LM folder and a CLIP/SigLIP folder; returns (model, processor).

    Without `config.random_init` the LLM and vision weights must load (else an error); with it,
    both are random from their config.json (and a warning says so).
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    if not config.model_name_or_path or not config.vision_tower:
        raise ValueError("a new model needs model_name_or_path (LLM) and vision_tower")
    projector_act = _projector_act(config.projector_type)
    remote = config.trust_remote_code
    text_config = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=remote)
    vision_config = vision_config_of(config.vision_tower, remote)
    check_feature_layer(config.vision_select_layer, vision_config)
    positions = tower_positions(vision_config)  # patches (+ CLS): measured once
    has_cls = positions > (vision_config.image_size // vision_config.patch_size) ** 2
    strategy = select_strategy(config.vision_select_feature, has_cls)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token; call add_llava_tokens first")
    pinpoints = _pinpoints(config, vision_config)
    config_cls, model_cls = ((LlavaNextConfig, LlavaNextForConditionalGeneration) if pinpoints
                             else (LlavaConfig, LlavaForConditionalGeneration))
    extra = {"image_grid_pinpoints": pinpoints} if pinpoints else {}
    llava_config = config_cls(
        **extra, vision_config=vision_config, text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=config.vision_select_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act=projector_act,
        multimodal_projector_bias=True,
        # what one image (one tile for anyres) becomes: the saved config says what the model is
        image_seq_length=positions - int(strategy == "default"),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    dtype = torch_dtype(config.load_dtype)
    model = model_cls._from_config(
        llava_config, attn_implementation=config.attn_implementation, dtype=dtype)
    _init_new_parts(model, config.random_init)
    if config.random_init:
        warnings.warn("random_init: the LLM and the vision tower have RANDOM weights (nothing "
                      "was loaded); only for tests and smoke runs", UserWarning, stacklevel=2)
    else:
        kwargs = {"dtype": dtype, "trust_remote_code": remote, "remedy": PARTS_REMEDY}
        llm = load_pretrained(AutoModelForCausalLM, config.model_name_or_path, "LLM", **kwargs)
        vision = load_pretrained(vision_model_class(vision_config), config.vision_tower,
                                 "vision tower", allowed_unexpected=TWO_TOWER_EXTRAS, **kwargs)
        parts = components(model)
        copy_weights(parts.llm, llm.get_decoder(), "LLM")
        copy_weights(parts.lm_head, llm.get_output_embeddings(), "LLM lm_head")
        copy_weights(parts.vision_tower, vision, "vision tower")
        del llm, vision
    model.resize_token_embeddings(len(tokenizer))  # exact: no pad_to_multiple_of
    if config.mm_use_im_start_end:
        _mean_marker_rows(model, marker_ids(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_processor(config.vision_tower, vision_config, tokenizer, strategy,
                                has_cls, pinpoints)
    return model, processor


def _init_new_parts(model: Any, random_tower: bool) -> None:
    """The projector starts as LLaVA's does: PyTorch's default Linear init, not transformers'
    normal(0, 0.02), which is so small that a from-scratch tower behind it barely learns
    (a `linear` projector's second layer: the identity, see `_projector_act`).
    A random-init (demo/test) CLIP tower gets position embeddings of std 1: at transformers'
    0.02 the patches are nearly indistinguishable by position and the demo's tiny tower never
    learned where a shape is (measured: left/right at chance; 0.9 with both changes)."""
    import torch

    parts = components(model)
    with gathered(parts.projector, modify=True):  # ZeRO-3: rank 0's init is everyone's
        for layer in parts.projector.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
        if is_single_linear(model):
            second = parts.projector.linear_2
            with torch.no_grad():
                second.weight.copy_(torch.eye(*second.weight.shape))
                second.bias.zero_()
    embeddings = getattr(getattr(parts.vision_tower, "vision_model", parts.vision_tower),
                         "embeddings", None)
    position = getattr(embeddings, "position_embedding", None)
    if random_tower and isinstance(position, torch.nn.Embedding):
        with gathered(position, modify=True), torch.no_grad():
            position.weight.normal_(0.0, 1.0)


def _mean_marker_rows(model: Any, ids: list[int]) -> None:
    """`<im_start>`/`<im_end>` start as the original's `initialize_vision_tokenizer` starts
    them: each row the mean of the rows before them, in the input and output embeddings."""
    import torch

    for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):
        with gathered(embedding, modify=True), torch.no_grad():
            weight = embedding.weight
            weight[ids] = weight[:min(ids)].mean(dim=0, keepdim=True)


def _pinpoints(config: RunConfig, vision_config: PretrainedConfig) -> list[list[int]] | None:
    """Anyres grid (LLaVA-NeXT) or None; default: 1x1, 1x2, 2x1, 2x2 tiles of the tower size."""
    if config.image_aspect_ratio != "anyres":
        return None
    s = vision_config.image_size
    return config.image_grid_pinpoints or [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
