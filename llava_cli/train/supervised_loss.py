"""The language-model loss computed only where it counts: at supervised positions.

A LLaVA batch is mostly image tokens and prompts whose labels are -100, yet the plain path
projects every position onto the vocabulary: [batch, seq, vocab] fp32 logits (about 1 GB for
one 2,048-token batch of 4 with a 32k vocabulary) and their gradient, most of them multiplied
by zero. Here the model is asked for the logits of the supervised positions only (transformers'
`logits_to_keep` accepts a boolean [batch, seq] mask and returns [kept, vocab]), and the
cross-entropy is taken over those rows. The sum and the normaliser are the same as
transformers' causal-LM loss, so the loss and the gradients are equal to the plain path's
(tested to float tolerance), including gradient accumulation and multi-GPU token averaging.

Imports torch only, so `bench/gpu_smoke.py` can use it on a bare GPU machine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, seq]: True where the position predicts a supervised next token.

    Position t predicts token t+1 (causal LM shift), so it is kept when labels[t+1] is
    supervised; the last position predicts nothing. In a padding-free (packed) row the first
    token of every sample is unsupervised, so no position predicts across a sample boundary.
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return keep


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """The supervised next tokens, in the order `supervised_positions` selects their logits."""
    shifted = labels[..., 1:]
    return shifted[shifted != IGNORE_INDEX]


def supervised_cross_entropy(outputs: Any, labels: torch.Tensor,
                             num_items_in_batch: torch.Tensor | int | None = None,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Loss from logits computed at `supervised_positions(labels)` only ([kept, vocab]).

    Normalised like transformers' `ForCausalLMLoss`: summed and divided by
    `num_items_in_batch` when the Trainer passes it (gradient accumulation / token averaging
    across devices), else the mean over this batch's supervised tokens. The logits are upcast
    to fp32 first, as transformers does. `label_smoothing` is the Trainer's
    `label_smoothing_factor`, with its `LabelSmoother`'s formula (shifted, as for causal LMs).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    targets = supervised_targets(labels).to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits for the {targets.shape[0]} supervised positions only "
                         f"([kept, vocab]); got shape {tuple(logits.shape)}: the model was not "
                         "called with logits_to_keep=supervised_positions(labels)")
    total = F.cross_entropy(logits.float(), targets, reduction="sum",
                            label_smoothing=label_smoothing)
    if num_items_in_batch is None:
        return total / max(targets.numel(), 1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def shifted_cross_entropy(outputs: Any, labels: torch.Tensor,
                          num_items_in_batch: torch.Tensor | int | None = None,
                          label_smoothing: float = 0.0) -> torch.Tensor:
    """`supervised_cross_entropy` from full [batch, seq, vocab] logits (the plain path with
    label smoothing). The Trainer's own label smoother shifts labels only for models in its
    causal-LM list, which LLaVA's are not: it would train each position on its own token."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    kept = logits[supervised_positions(labels).to(logits.device)]
    return supervised_cross_entropy({"logits": kept}, labels, num_items_in_batch,
                                    label_smoothing)
