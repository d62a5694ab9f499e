"""The projector of a live model: loading a projector file into it and reading its tensors out,
whole under DeepSpeed ZeRO-3 too (the file formats themselves are `artifacts.projector_file`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from llava_cli.artifacts.projector_file import (
    EMBEDDINGS_KEY,
    PROJECTOR_PREFIX,
    is_single_linear_state,
    read_projector_parts,
)
from llava_cli.model.partitioned import gathered
from llava_cli.model.parts import components, is_single_linear

# Which rows of input embeddings saved beside the projector to load: none (a file holding
# them is refused), the rows of these token ids (stage 2, as the original), or all (resume).
EmbeddingRows = Sequence[int] | Literal["all"] | None


def load_projector_weights(model: Any, file: str | Path, embedding_rows: EmbeddingRows = None
                           ) -> None:
    """Load a projector file into `model`, with a clear error when shapes differ; a vision
    tower position embedding saved beside it (`tune_vit_pos_embedding`) goes into the
    tower's position embedding, input embeddings saved beside it (`mm_use_im_start_end`)
    into the rows `embedding_rows` names."""
    parts = components(model)
    saved = read_projector_parts(file)
    if saved.embeddings is not None and embedding_rows is None:
        raise ValueError(f"{file}: holds the input embeddings of an mm_use_im_start_end run "
                         "beside the projector; pass --set mm_use_im_start_end=true")
    if saved.embeddings is None and embedding_rows not in (None, "all"):
        raise ValueError(f"{file}: holds no input embeddings, so the <im_start>/<im_end> rows "
                         "would stay untrained; use a projector trained with "
                         "mm_use_im_start_end, or drop the setting")
    with gathered(parts.projector, modify=True):
        _copy_into(parts.projector, _with_identity(model, saved.state, file), file)
    if saved.position is not None:
        _copy_position_embedding(parts.vision_tower, saved.position, file)
    if saved.embeddings is not None:
        _copy_embedding_rows(parts.llm.get_input_embeddings(), saved.embeddings,
                             embedding_rows, file)


def _copy_embedding_rows(embedding: Any, tensor: Any, rows: EmbeddingRows, file: str | Path
                         ) -> None:
    """As the original's `initialize_vision_tokenizer` with `pretrain_mm_mlp_adapter`: the new
    tokens' rows from a whole saved matrix (ours: by id; the original's, of its own vocabulary
    size: its last rows, where it adds them), or a matrix of just those rows; all to resume."""
    import torch

    with gathered(embedding, modify=True), torch.no_grad():
        weight = embedding.weight
        if rows == "all" or tensor.shape == weight.shape:
            if tensor.shape != weight.shape:
                raise ValueError(f"{file}: the input embeddings have shape "
                                 f"{tuple(tensor.shape)} but this model's are "
                                 f"{tuple(weight.shape)}")
            chosen = slice(None) if rows == "all" else list(rows or [])
            weight[chosen] = tensor[chosen].to(weight.dtype)
        elif rows and tensor.shape[0] >= len(rows) and tensor.shape[1] == weight.shape[1]:
            weight[list(rows)] = tensor[-len(rows):].to(weight.dtype)
        else:
            raise ValueError(f"{file}: the input embeddings have shape {tuple(tensor.shape)}; "
                             f"this model needs {tuple(weight.shape)} or {len(rows or [])} "
                             "rows (the original's layout): trained for another LLM")


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


def projector_state(model: Any, full_state: dict[str, Any] | None = None,
                    embeddings: bool = False) -> dict[str, Any]:
    """The projector's tensors under their stock on-disk names (`multi_modal_projector.…`),
    with `embeddings` the whole input-embedding matrix too (`EMBEDDINGS_KEY`, as the original
    saves it into mm_projector.bin when `mm_use_im_start_end` trains it in stage 1).

    `full_state`: a whole-model state dict already gathered (DeepSpeed's save path); without
    it the parts are gathered here — collectively, so call this on every rank.
    """
    if full_state is not None:
        state = {PROJECTOR_PREFIX + k.split(PROJECTOR_PREFIX, 1)[1]: v.detach().cpu().contiguous()
                 for k, v in full_state.items() if PROJECTOR_PREFIX in k}
        if not state:  # DeepSpeed hands an empty dict when ZeRO-3 does not gather on save
            raise ValueError("no projector weights to save: with ZeRO-3 set "
                             "stage3_gather_16bit_weights_on_model_save: true (as "
                             "recipes/deepspeed/zero3.json does)")
        if embeddings:
            state[EMBEDDINGS_KEY] = next(v.detach().cpu().contiguous() for k, v in
                                         full_state.items() if k.endswith("embed_tokens.weight"))
        return state
    parts = components(model)
    with gathered(parts.projector):
        state = {PROJECTOR_PREFIX + k: v.detach().cpu().clone().contiguous()
                 for k, v in parts.projector.state_dict().items()}
    if embeddings:
        embedding = parts.llm.get_input_embeddings()
        with gathered(embedding):
            state[EMBEDDINGS_KEY] = embedding.weight.detach().cpu().clone().contiguous()
    return state
