"""One pair batch through a LLaVA model: the images encoded once, the replies' log-probs.

transformers' own seam carries the shared encoding: `LlavaModel.forward` takes
`mm_encoder_outputs` in place of `pixel_values` and scatters their `pooler_output` (one
projected tensor per image, in order) into the image-token positions. The batch's 2B rows
hold every image twice (chosen rows, then rejected rows), so the B images' features are
handed over twice: the vision tower and the projector run once per pair, and gradients from
both replies reach the projector through the one encoding.
"""

from __future__ import annotations

from typing import Any

from llava_cli.model.parts import base_model
from llava_cli.train.dpo.objective import ReplyLogProbs, reply_log_probs
from llava_cli.train.supervised_loss import supervised_positions


def llava_of(model: Any) -> Any:
    """The `Llava…ForConditionalGeneration` inside DDP, a DeepSpeed engine and PEFT."""
    return base_model(model)


def encode_images(model: Any, batch: dict[str, Any]) -> Any:
    """The batch's images through the vision tower and projector, once, as the model takes
    them for all 2B rows (`mm_encoder_outputs["image"]`); None for a batch without images."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return None
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    llava = llava_of(model)
    config = llava.config
    kwargs: dict[str, Any] = {
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy}
    if batch.get("image_sizes") is not None:
        kwargs["image_sizes"] = batch["image_sizes"]
    encoded = llava.model.get_image_features(pixel_values=pixels, return_dict=True, **kwargs)
    features = list(encoded.pooler_output)
    return BaseModelOutputWithPooling(pooler_output=features + features)


def reply_forward(model: Any, batch: dict[str, Any], images: Any = None,
                  with_nll: bool = False) -> ReplyLogProbs:
    """Each row's reply log-probs from one forward of `model` (logits at the supervised
    positions only); `images` from `encode_images` (None: the batch has none)."""
    labels = batch["labels"]
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False,
                              "logits_to_keep": supervised_positions(labels)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    if images is not None:
        inputs["mm_encoder_outputs"] = {"image": images}
    logits = model(**inputs).logits
    return reply_log_probs(logits, labels, with_nll)
