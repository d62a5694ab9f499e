"""`PreferenceTrainer`: the LLaVA trainer with the preference objective as its loss.

Everything else is `LlavaTrainer`'s (via `EvaluatingTrainer`: `--eval-generate` answers its QA
set at each evaluation here too; parameter groups, checkpoints complete or absent, resume
that restores the weights, dropped-record totals), so LoRA/QLoRA, ZeRO-2/3, resume and the
outputs behave as in supervised training. The statistics TRL logs (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/…) are averaged over every
pair since the last log, on all ranks, and logged beside `loss` (`eval_…` beside
`eval_loss`, so `metric_for_best_model` can name them).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from llava_cli.data.conversation import RecordError
from llava_cli.train.dpo.objective import PreferenceObjective, ReplyLogProbs
from llava_cli.train.dpo.pair_forward import encode_images, reply_forward
from llava_cli.train.dpo.reference_policy import Reference
from llava_cli.train.eval_generate import EvaluatingTrainer


class PreferenceTrainer(EvaluatingTrainer):
    """Trains on preference pairs against `reference` (`train.dpo.reference_policy`); the
    objective's settings come from `args` (`beta`, `loss_type`, `rpo_alpha`)."""

    def __init__(self, *args: Any, reference: Reference, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.objective = PreferenceObjective(self.args.beta, self.args.loss_type,
                                             self.args.rpo_alpha)
        # The loss is a mean over pairs: the Trainer divides it by the accumulation steps.
        self.compute_loss_func = None
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(lambda: [0, 0]),
                                                          "eval": defaultdict(lambda: [0, 0])}

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The preference loss of one batch of pairs (statistics kept for the next log)."""
        batch = dict(inputs)
        records = batch.pop("record_index", None)
        images = encode_images(model, batch)
        split = "train" if model.training else "eval"
        if self.reference.tables:
            reference = self.reference.looked_up(split, records)
        else:
            reference = self.reference.log_probs(model, batch, images)
        policy = reply_forward(model, batch, images, self.objective.rpo_alpha is not None)
        loss, stats = self.objective(policy, reference)
        self._keep(stats, split)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _keep(self, stats: dict[str, torch.Tensor], split: str) -> None:
        # One gather of every statistic's (sum, count) per step: the mean over all ranks.
        names = sorted(stats)
        local = torch.stack([torch.stack([stats[n].float().sum(),
                                          torch.tensor(float(stats[n].numel()),
                                                       device=stats[n].device)])
                             for n in names])
        totals = self.accelerator.gather(local[None]).sum(0) if self.args.world_size > 1 \
            else local
        for name, (total, count) in zip(names, totals.tolist(), strict=True):
            kept = self._sums[split][name]
            kept[0] += total
            kept[1] += count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the preference statistics since the last one."""
        split = "eval" if any(key.startswith("eval_") for key in logs) else \
            "train" if "loss" in logs else None
        if split is not None:
            prefix = "eval_" if split == "eval" else ""
            for name, (total, count) in self._sums[split].items():
                logs[prefix + name] = round(total / max(count, 1), 6)
            self._sums[split].clear()
        super().log(logs, start_time)

    def precompute_reference(self) -> None:
        """Run the reference once over the training (and held-out) records and keep its
        log-probs per record; each rank computes a shard and all receive the tables. A frozen
        copy is freed afterwards."""
        datasets = {"train": self.train_dataset, "eval": self.eval_dataset}
        for split, dataset in datasets.items():
            if dataset is None:
                continue
            table = torch.full((len(dataset), 4), float("nan"), dtype=torch.float64)
            for indices, values in self._reference_pass(dataset):
                table[indices] = values
            self.reference.tables[split] = table
        self.reference.release_copy()

    def _reference_pass(self, dataset: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's shard of `dataset` through the reference, gathered from all ranks."""
        import torch.distributed as dist

        world, rank = self.args.world_size, self.args.process_index
        # A rank past the last record (fewer records than ranks) recomputes one: it must run
        # its forwards too.
        positions = list(range(rank, len(dataset), world)) or [rank % len(dataset)]
        # Every rank runs as many batches (ZeRO-3 gathers weights collectively per forward).
        positions += positions[-1:] * (-(-len(dataset) // world) - len(positions))
        loader = DataLoader(Subset(dataset, positions), self.args.per_device_eval_batch_size,
                            collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        mine = []
        for batch in loader:
            batch = self._prepare_inputs(batch)
            batch.pop("dropped_records", None)
            if errors := batch.pop("record_errors", None):
                raise RecordError(*errors[0])
            records = batch.pop("record_index")
            found = self.reference.log_probs(self.model_wrapped, batch)
            mine.append((records.cpu(), _as_rows(found)))
        if world > 1 and dist.is_initialized():
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, mine)
            return [part for rank_parts in everyone for part in rank_parts]
        return mine


def _as_rows(found: ReplyLogProbs) -> torch.Tensor:
    """[pairs, 4]: chosen sum, rejected sum, chosen tokens, rejected tokens."""
    half = found.pairs
    sums, tokens = found.sums.double().cpu(), found.tokens.double().cpu()
    return torch.stack([sums[:half], sums[half:], tokens[:half], tokens[half:]], dim=1)
