"""The preference stage (`llava dpo`): preference records as pairs of samples, the padded
batches of 2B rows they make, the reference model, and the preference trainer.

The data checks are the supervised stage's, run on pairs (`data.preference_pairs.PairBuilder`):
a bad record, a prompt that does not end with a human turn or a reply truncated away is
named before anything heavy loads.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from llava_cli.config.run_config import RunConfig
from llava_cli.data.batching.pair_batches import PairCollator
from llava_cli.data.dataset import PreferenceDataset
from llava_cli.data.preference_pairs import KindGuard, PairBuilder
from llava_cli.data.problems import Problem
from llava_cli.data.samples import SampleBuilder
from llava_cli.data.scan import Report
from llava_cli.train.stages import supervised


def pairs_only(builder: SampleBuilder) -> KindGuard:
    """Preference pairs from `builder`'s records, refusing supervised records (a file holds
    one kind)."""
    return KindGuard(PairBuilder(builder), True, "llava dpo trains on preference records; "
                     "train supervised records with llava finetune")


def check_data(config: RunConfig) -> np.ndarray | None:
    """`supervised.check_data` on preference pairs, then a warning for each kind of pair that
    trains on little or nothing (they are trained on, as `inspect-data --check` says)."""
    return supervised.check_data(config, wrap=pairs_only,
                                 after=lambda report: warn_weak_pairs(report, config))


WEAK_PAIRS = {
    Problem.SAME_REPLIES: "have the same chosen and rejected reply (the pair teaches nothing: "
                          "its DPO gradient is zero)",
    Problem.EMPTY_REPLY: "have an empty chosen or rejected reply",
    Problem.TRUNCATED: "are cut to model_max_length (a reply cut short is scored as if whole)",
}


def warn_weak_pairs(report: Report, config: RunConfig) -> None:
    """One warning per kind of weak pair: how many, and the first."""
    logger = logging.getLogger("llava_cli")
    for kind, what in WEAK_PAIRS.items():
        counter = report.truncations if kind == Problem.TRUNCATED else report.warnings
        count = counter.counts.get(kind, 0)
        if count:
            first = (counter.examples.get(kind) or ["?"])[0]
            logger.warning("dpo data %s: %d pair(s) %s; the first: record %r. `%s` lists them.",
                           config.data_path, count, what, first,
                           supervised.check_command(config, config.data_path))


def datasets(config: RunConfig, model: Any, processor: Any, lengths: np.ndarray | None = None
             ) -> tuple[PreferenceDataset, PreferenceDataset | None]:
    """The training pairs and, with `eval_data_path`, the checked held-out pairs."""
    train = supervised.build_dataset(config, model, processor, kind=PreferenceDataset,
                                     wrap=pairs_only)
    if not config.eval_data_path:
        return train, None  # type: ignore[return-value]
    held_out = supervised.build_dataset(config, model, processor, held_out=True,
                                        kind=PreferenceDataset, wrap=pairs_only)
    supervised.check_held_out(held_out, config)
    return train, held_out  # type: ignore[return-value]


def collator(config: RunConfig, processor: Any) -> PairCollator:
    """Pairs → chosen rows then rejected rows, padded together, the images once."""
    return PairCollator(supervised.collator(config.model_copy(update={"packing": "off"}),
                                            processor))


def trainer(config: RunConfig, loaded: Any, model: Any, **kwargs: Any) -> Any:
    """A `PreferenceTrainer` against the starting model (`config.reference_kind`), with the
    reference log-probs precomputed when asked."""
    from llava_cli.model.start import load_starting_model
    from llava_cli.train.dpo.preference_trainer import PreferenceTrainer
    from llava_cli.train.dpo.reference_policy import (
        COPY,
        Reference,
        frozen_copy,
        vision_frozen,
    )

    kind, args = config.reference_kind, kwargs["args"]
    copy = frozen_copy(load_starting_model(config).model, args) if kind == COPY else None
    reference = Reference(kind, copy, shares_images=vision_frozen(model))
    built = PreferenceTrainer(model=model, reference=reference, **kwargs)
    if config.precompute_ref_log_probs:
        built.precompute_reference()
    return built
