"""The original LLaVA's forward pass, computed from an original-layout folder read under the
original's own key names — the yardstick a conversion is checked against, both ways.

Built from plain parts, as the original's `LlavaLlamaForCausalLM` is: a `LlamaForCausalLM`
(its state dict is the original's `model.*` + `lm_head.*` as they are), the vision tower
(`model.vision_tower.vision_tower.*` in the checkpoint, else the `mm_vision_tower` folder),
and `mm_projector` as `nn.Sequential(Linear, GELU, Linear)` under its keys `0.*`, `2.*`. The
image's features replace the `-200` id (IMAGE_TOKEN_INDEX); a LoRA run is applied with PEFT
to the plain LLM and merged, as the original's `load_pretrained_model` does. Every load is
strict.
"""

from __future__ import annotations

import gc
from typing import Any

from llava_cli.artifacts.original_layout import (
    IMAGE_TOKEN_INDEX,
    MM_PROJECTOR_FILE,
    NON_LORA_FILE,
    PROJECTOR_KEY,
    TOWER_KEY,
    OriginalCheckpoint,
    read_state,
    text_config,
)
from llava_cli.merge.verify import VerificationError
from llava_cli.model.load import TWO_TOWER_EXTRAS, load_pretrained
from llava_cli.model.vision import vision_config_of, vision_model_class


class ConversionError(VerificationError):
    """The converted model does not compute the original's logits (the boundary exits 1)."""


def checked_logits(against: str, logits: Any, reference: Any, log: Any, failure: str) -> Any:
    """Compare `logits` with `reference` (over the reference's positions) at float32's
    tolerance, log the check, and raise ConversionError (`failure` first) when it fails."""
    from llava_cli.merge.verify import compare, tolerance

    check = compare(against, logits[:, :reference.shape[1]], reference,
                    tolerance("float32", 16))
    log(check.describe())
    if not check.ok:
        raise ConversionError(f"{failure}; nothing was written: {check.describe()}")
    return check


def original_logits(original: OriginalCheckpoint, tower: str, base: str | None,
                    ids: list[int], pixel_values: Any) -> Any:
    """Float32 logits of the original model on `ids` (with one -200) and `pixel_values`
    ([1, 3, H, W]); one position per text id, and as many for the image as it has features."""
    import torch

    state = read_state(original.folder) if original.kind == "full" else {}
    llm = _llm(original, state, base)
    vision = _tower(state, tower)
    projector = _projector(original, state, llm.config.hidden_size)
    layer = original.config.get("mm_vision_select_layer", -2)
    with torch.no_grad():
        hidden = vision(pixel_values.to(torch.float32), output_hidden_states=True)
        features = hidden.hidden_states[layer]
        if original.config.get("mm_vision_select_feature", "patch") == "patch":
            features = features[:, 1:]  # the original drops the first (CLS) position
        image = projector(features)[0]
        where = ids.index(IMAGE_TOKEN_INDEX)
        embed = llm.get_input_embeddings()
        before = embed(torch.tensor(ids[:where]))
        after = embed(torch.tensor(ids[where + 1:]))
        embeds = torch.cat([before, image, after])[None]
        logits = llm(inputs_embeds=embeds).logits[0].float()
    del llm, vision, projector, state
    gc.collect()
    return logits


def _llm(original: OriginalCheckpoint, state: dict[str, Any], base: str | None) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if original.kind == "full":
        llm = LlamaForCausalLM(LlamaConfig(**text_config(original.config)))
        own = {k: v for k, v in state.items()
               if not k.startswith((PROJECTOR_KEY, TOWER_KEY))}
        llm.load_state_dict(own, strict=True)  # key names as the original wrote them
        return llm.eval()
    llm = load_pretrained(AutoModelForCausalLM, base, "base LLM").eval()
    if original.kind == "lora":
        from peft import PeftModel

        # PEFT itself on the plain LLM: the original adapter's keys fit it as they are.
        llm = PeftModel.from_pretrained(llm, str(original.folder)).merge_and_unload()
    return llm.eval()


def _tower(state: dict[str, Any], tower: str) -> Any:
    config = vision_config_of(tower)
    cls = vision_model_class(config)
    own = {k[len(TOWER_KEY):].removeprefix("vision_model."): v for k, v in state.items()
           if k.startswith(TOWER_KEY)}
    if not own:
        return load_pretrained(cls, tower, "vision tower",
                               allowed_unexpected=TWO_TOWER_EXTRAS).eval()
    vision = cls(config)
    vision.load_state_dict({k: v.float() for k, v in own.items()}, strict=True)
    return vision.eval()


def _projector(original: OriginalCheckpoint, state: dict[str, Any], hidden: int) -> Any:
    import torch

    if original.kind == "full":
        own = {k[len(PROJECTOR_KEY):]: v for k, v in state.items() if k.startswith(PROJECTOR_KEY)}
    else:
        name = NON_LORA_FILE if original.kind == "lora" else MM_PROJECTOR_FILE
        loaded = read_state(original.folder, name)
        own = {k.split("mm_projector.", 1)[1]: v for k, v in loaded.items()
               if "mm_projector." in k}
    width = own["0.weight"].shape[1]
    projector = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, hidden))
    projector.load_state_dict({k: v.float() for k, v in own.items()}, strict=True)
    return projector.eval()


def probe_ids(tokenizer: Any, question: str) -> list[int]:
    """v1 prompt ids as the original's `tokenizer_image_token` makes them: BOS, the text
    before `<image>`, -200, the text after (no second BOS)."""
    system = ("A chat between a curious user and an artificial intelligence assistant. The "
              "assistant gives helpful, detailed, and polite answers to the user's questions.")
    head, tail = f"{system} USER: ", f"\n{question} ASSISTANT:"
    first = tokenizer(head).input_ids
    second = tokenizer(tail, add_special_tokens=False).input_ids
    return [*first, IMAGE_TOKEN_INDEX, *second]


def expand_ids(ids: list[int], image_token_id: int, count: int) -> list[int]:
    """Our ids for the original's: the -200 becomes `count` image tokens."""
    where = ids.index(IMAGE_TOKEN_INDEX)
    return ids[:where] + [image_token_id] * count + ids[where + 1:]

