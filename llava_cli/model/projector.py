"""The projector of a live model: loading a projector file into it and reading its tensors out,
whole under DeepSpeed ZeRO-3 too (the file formats themselves are `artifacts.projector_file`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_cli.artifacts.projector_file import (
    PROJECTOR_PREFIX,
    is_single_linear_state,
    read_projector_parts,
)
from llava_cli.model.partitioned import gathered
from llava_cli.model.parts import components, is_single_linear


def load_projector_weights(model: Any, file: str | Path) -> None:
    """Load a projector file into `model`, with a clear error when shapes differ; a vision
    tower position embedding saved beside it (`tune_vit_pos_embedding`) goes into the
    tower's position embedding."""
    parts = components(model)
    state, position = read_projector_parts(file)
    with gathered(parts.projector, modify=True):
        _copy_into(parts.projector, _with_identity(model, state, file), file)
    if position is not None:
        _copy_position_embedding(parts.vision_tower, position, file)


def _with_identity(model: Any, state: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """LLaVA's `linear` projector file (one weight and bias) completed with the identity
    second layer of the stock layout (`model.build`); refused for a two-layer projector."""
    import torch

    if set(state) != {"linear_1.weight", "linear_1.bias"}:
        if is_single_linear(model) and not is_single_linear_state(state):
            # Shapes may fit (linear_2 is square), but this model has no activation between
            # the two layers and never trains linear_2: the file's MLP would be computed wrong.
            raise ValueError(f"{file}: a two-layer (mlp2x_gelu) projector but this model's "
                             "projector is `linear`; build the model with projector_type "
                             "mlp2x_gelu, or give a linear projector file")
        return state
    if not is_single_linear(model):
        raise ValueError(f"{file}: a `linear` projector (one layer) but this model's projector "
                         "is mlp2x_gelu; build the model with projector_type linear")
    size = state["linear_1.weight"].shape[0]
    return {**state, "linear_2.weight": torch.eye(size), "linear_2.bias": torch.zeros(size)}


def _copy_position_embedding(tower: Any, tensor: Any, file: str | Path) -> None:
    import torch

    embeddings = getattr(tower, "embeddings", None)
    target = getattr(embeddings, "position_embedding", None)
    weight = getattr(target, "weight", target)  # nn.Embedding (CLIP, SigLIP) or a Parameter
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{file}: holds a position embedding but this vision tower has no "
                         "embeddings.position_embedding; use a CLIP or SigLIP tower")
    with gathered(embeddings, modify=True):
        if tensor.numel() != weight.numel() or tensor.shape[-1] != weight.shape[-1]:
            raise ValueError(f"{file}: the position embedding has shape {tuple(tensor.shape)} "
                             f"but this vision tower's is {tuple(weight.shape)}; the file was "
                             "trained with another vision tower")
        with torch.no_grad():  # InternViT keeps a leading batch axis of 1: same numbers
            weight.copy_(tensor.reshape(weight.shape).to(weight.dtype))


def _copy_into(projector: Any, state: dict[str, Any], file: str | Path) -> None:
    import torch

    target = projector.state_dict()
    if set(state) != set(target):
        # A whole checkpoint given as the file would list thousands of keys: name a few.
        missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
        raise ValueError(f"{file}: projector keys do not match this model's (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}"
                         f"{' …' if len(unexpected) > 4 else ''}); pass a projector file of "
                         "this projector type (mlp2x_gelu: linear_1/linear_2 weight and bias)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(
                f"{file}: projector {key} has shape {tuple(tensor.shape)} but this model needs "
                f"{tuple(target[key].shape)} (vision hidden size × LLM hidden size); the file "
                "was trained for another LLM or vision tower")
    with torch.no_grad():
        projector.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()})


def projector_state(model: Any, full_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The projector's tensors under their stock on-disk names (`multi_modal_projector.…`).

    `full_state`: a whole-model state dict already gathered (DeepSpeed's save path); without
    it the projector is gathered here — collectively, so call this on every rank.
    """
    if full_state is not None:
        state = {PROJECTOR_PREFIX + k.split(PROJECTOR_PREFIX, 1)[1]: v.detach().cpu().contiguous()
                 for k, v in full_state.items() if PROJECTOR_PREFIX in k}
        if not state:  # DeepSpeed hands an empty dict when ZeRO-3 does not gather on save
            raise ValueError("no projector weights to save: with ZeRO-3 set "
                             "stage3_gather_16bit_weights_on_model_save: true (as "
                             "recipes/deepspeed/zero3.json does)")
        return state
    projector = components(model).projector
    with gathered(projector):
        return {PROJECTOR_PREFIX + k: v.detach().cpu().clone().contiguous()
                for k, v in projector.state_dict().items()}
