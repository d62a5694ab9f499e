"""The reference policy of preference training: the starting model, three ways.

- `disabled-adapter` (LoRA runs): the trained model itself with its adapters switched off —
  the starting weights, with no second copy in memory;
- `copy`: a frozen second load of the starting model (under ZeRO-3 partitioned like the
  policy and run by its own DeepSpeed inference engine);
- precomputed (`precompute_ref_log_probs`): either of the above run once over the data
  before training; the log-probs are kept per record (every rank computes a shard, all
  ranks get the table) and a copy is freed before the first step.

When the vision tower and projector are frozen, the reference's image features are the
policy's (the same weights), so the images are encoded once per pair for both.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator
from typing import Any

import torch

from llava_cli.model.parts import components
from llava_cli.train.dpo.objective import ReplyLogProbs
from llava_cli.train.dpo.pair_forward import encode_images, llava_of, reply_forward

COPY, DISABLED_ADAPTER = "copy", "disabled-adapter"


def vision_frozen(model: Any) -> bool:
    """Whether no parameter of the vision tower or the projector trains."""
    parts = components(llava_of(model))
    return not any(param.requires_grad for part in (parts.vision_tower, parts.projector)
                   for param in part.parameters())


class Reference:
    """Reply log-probs of the reference policy for a batch of pairs."""

    def __init__(self, kind: str, model: Any = None, shares_images: bool = False) -> None:
        self.kind = kind
        self.model = model  # the frozen copy (kind `copy`), else None
        self.shares_images = shares_images
        # precomputed, per split ("train", "eval"): [records, 4] sums and token counts
        self.tables: dict[str, torch.Tensor] = {}

    def log_probs(self, policy: Any, batch: dict[str, Any], images: Any = None
                  ) -> ReplyLogProbs:
        """The reference's log-probs of the batch (under no_grad). `policy` is the model
        being trained (wrapped or not); `images` its encoding, used when shared."""
        with torch.no_grad(), self._switched(policy) as model:
            if images is None or not self.shares_images:
                images = encode_images(model, batch)
            return reply_forward(model, batch, images)

    def looked_up(self, split: str, records: torch.Tensor) -> ReplyLogProbs:
        """The precomputed log-probs of these records (their `record_index` in `split`)."""
        rows = self.tables[split][records.cpu()]
        if torch.isnan(rows).any():
            raise RuntimeError("a record has no precomputed reference log-probs (its index was "
                               "not in the precomputed pass); this is a defect: please report")
        # as ReplyLogProbs lays rows out: the chosen rows, then the rejected rows
        return ReplyLogProbs(torch.cat([rows[:, 0], rows[:, 1]]),
                             torch.cat([rows[:, 2], rows[:, 3]]).long())

    @contextlib.contextmanager
    def _switched(self, policy: Any) -> Iterator[Any]:
        if self.kind == COPY:
            yield self.model
            return
        from llava_cli.model.parts import without_engine

        peft_model = without_engine(policy)
        peft_model = peft_model if hasattr(peft_model, "disable_adapter") else policy
        with peft_model.disable_adapter():
            yield policy

    def release_copy(self) -> None:
        """Free the frozen copy (after precomputing: it is not needed again)."""
        self.model = None
        gc.collect()


def frozen_copy(model: Any, args: Any) -> Any:
    """`model` (a second load of the starting model) frozen for inference: on the training
    device, or under ZeRO-3 in a DeepSpeed inference engine of its own (its weights are
    partitioned as they loaded, and only an engine gathers them for a forward)."""
    model.eval()
    model.requires_grad_(False)
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.is_zero3():
        return model.to(args.device)
    import deepspeed

    settings = _inference_settings(config.config, model.config.get_text_config().hidden_size)
    engine, *_ = deepspeed.initialize(model=model, config=settings)
    engine.eval()
    return engine


def _inference_settings(training: dict[str, Any], hidden: int) -> dict[str, Any]:
    """The run's DeepSpeed settings for a model that only runs forward: no optimizer or
    scheduler, and the sizes left "auto" (the Trainer fills them only for its own engine)
    worked out as transformers does from the hidden size."""
    settings = copy.deepcopy(training)
    settings.pop("optimizer", None)
    settings.pop("scheduler", None)
    zero = settings.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden * hidden,
             "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
             "stage3_param_persistence_threshold": 10 * hidden}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for section in ("fp16", "bf16"):
        if isinstance(settings.get(section), dict) and settings[section].get("enabled") == "auto":
            settings[section]["enabled"] = False
    return settings
