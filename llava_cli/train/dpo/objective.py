"""The preference objective: reply log-probabilities and the DPO, IPO and RPO losses.

A batch holds B pairs as 2B rows, the chosen replies first, then the rejected ones (the
collator's order); only the final reply of each row is supervised. The model is asked for
logits at the supervised positions only (`logits_to_keep`, as in supervised training), so
the log-probabilities cost [reply tokens, vocab], not [rows, sequence, vocab].

The formulas are DPO's (Rafailov et al. 2023), IPO's (Azar et al. 2023) and RPO's extra
negative log-likelihood of the chosen reply (Pang et al. 2024), with the names and averaging
TRL's `DPOTrainer` uses, so its users read the same numbers: rewards are beta times the
policy-minus-reference log-ratio of each reply; IPO compares per-token mean log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_cli.train.supervised_loss import supervised_positions, supervised_targets

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class ReplyLogProbs:
    """Summed log-probabilities of each row's reply, its token count, and (when asked) the
    mean negative log-likelihood of the chosen replies' tokens."""

    sums: torch.Tensor  # [2B]
    tokens: torch.Tensor  # [2B]
    chosen_nll: torch.Tensor | None = None

    @property
    def pairs(self) -> int:
        """How many pairs the rows hold."""
        return self.sums.shape[0] // 2

    def chosen(self, mean: bool = False) -> torch.Tensor:
        """The chosen replies' log-probs (per-token means with `mean`)."""
        return self._half(0, mean)

    def rejected(self, mean: bool = False) -> torch.Tensor:
        """The rejected replies' log-probs (per-token means with `mean`)."""
        return self._half(1, mean)

    def _half(self, half: int, mean: bool) -> torch.Tensor:
        rows = slice(half * self.pairs, (half + 1) * self.pairs)
        sums = self.sums[rows]
        return sums / self.tokens[rows].clamp(min=1) if mean else sums


def reply_log_probs(logits: torch.Tensor, labels: torch.Tensor, with_nll: bool = False
                    ) -> ReplyLogProbs:
    """Per-row sums of the supervised tokens' log-probabilities, from logits computed at
    `supervised_positions(labels)` only ([kept, vocab], in row-major order)."""
    keep = supervised_positions(labels).to(logits.device)
    targets = supervised_targets(labels).to(logits.device)
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits for the {targets.shape[0]} reply positions only "
                         f"([kept, vocab]); got shape {tuple(logits.shape)}")
    token_logps = torch.gather(logits.float().log_softmax(-1), 1, targets[:, None])[:, 0]
    rows = keep.nonzero()[:, 0]
    sums = token_logps.new_zeros(labels.shape[0]).index_add(0, rows, token_logps)
    tokens = torch.bincount(rows, minlength=labels.shape[0])
    nll = None
    if with_nll:  # TRL's RPO term: cross-entropy over every chosen token of the batch
        chosen = rows < labels.shape[0] // 2
        nll = -token_logps[chosen].sum() / chosen.sum().clamp(min=1)
    return ReplyLogProbs(sums, tokens, nll)


@dataclass(frozen=True)
class PreferenceObjective:
    """`loss_type` sigmoid (DPO) or ipo, with `beta`; `rpo_alpha` adds the chosen replies'
    NLL times alpha (None: no such term)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    rpo_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"beta {self.beta}: must be above 0")

    @property
    def length_normalized(self) -> bool:
        """IPO compares per-token mean log-probs (as TRL does); DPO compares sums."""
        return self.loss_type == "ipo"

    def __call__(self, policy: ReplyLogProbs, reference: ReplyLogProbs
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss over the batch's pairs and the per-pair statistics TRL logs
        (detached: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
        logps/chosen, logps/rejected). The rewards are beta times the summed log-ratios
        whatever the loss, as TRL reports them."""
        chosen_ratio, rejected_ratio = self._ratios(policy, reference, mean=False)
        scores = self._ratios(policy, reference, mean=True) if self.length_normalized \
            else (chosen_ratio, rejected_ratio)
        logits = scores[0] - scores[1]
        if self.loss_type == "sigmoid":
            losses = -F.logsigmoid(self.beta * logits)
        else:
            losses = (logits - 1 / (2 * self.beta)) ** 2
        loss = losses.mean()
        if self.rpo_alpha is not None:
            if policy.chosen_nll is None:
                raise ValueError("rpo_alpha needs the chosen replies' NLL: compute the policy's "
                                 "log-probs with with_nll=True")
            loss = loss + self.rpo_alpha * policy.chosen_nll
        chosen_rewards = (self.beta * chosen_ratio).detach()
        rejected_rewards = (self.beta * rejected_ratio).detach()
        stats = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                 "rewards/margins": chosen_rewards - rejected_rewards,
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                 "logps/chosen": policy.chosen().detach(),
                 "logps/rejected": policy.rejected().detach()}
        if policy.chosen_nll is not None:
            stats["nll_loss"] = policy.chosen_nll.detach()[None]
        return loss, stats

    @staticmethod
    def _ratios(policy: ReplyLogProbs, reference: ReplyLogProbs, mean: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy-minus-reference log-probs of the chosen and the rejected replies."""
        chosen, rejected = policy.chosen(mean), policy.rejected(mean)
        return (chosen - reference.chosen(mean).to(chosen),
                rejected - reference.rejected(mean).to(rejected))
