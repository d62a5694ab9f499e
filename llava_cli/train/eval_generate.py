"""`--eval-generate QA.json`: at each evaluation the in-training model answers a QA file and
`eval_accuracy` (and `eval_accuracy_<group>`) is logged beside `eval_loss`, so
`metric_for_best_model: eval_accuracy` and `load_best_model_at_end` can use it.

The answers and scores are `llava evaluate`'s (`answers.qa_set`: the same reading of the QA
file, the same batched greedy answering through the training chat template, the same scorer),
so the accuracy logged at the last step is `llava evaluate`'s on the saved output. Under
torch.distributed the records are shared out across the ranks and the answers gathered, and
every rank scores them all: every rank holds the same metrics (each decides the best
checkpoint itself). Every rank makes the same generate calls (`shard`), which DeepSpeed ZeRO-3
needs: each forward gathers the weights from every rank, and `generate` runs in lock-step
there (`synced_gpus`, transformers' default under ZeRO-3).

Without held-out records (`eval_data_path`), the QA set itself is the Trainer's evaluation
dataset, and an evaluation is the answers alone: eval_accuracy, no eval_loss.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from transformers.trainer_utils import speed_metrics

from llava_cli.answers.generator import Generator
from llava_cli.answers.qa import QARecord
from llava_cli.answers.qa_set import (
    QASet,
    accuracy_metrics,
    answer_questions,
    read_qa_set,
    tally_answers,
)
from llava_cli.config.run_config import RunConfig
from llava_cli.train.trainer import LlavaTrainer


def check_qa_set(config: RunConfig) -> QASet | None:
    """The run's QA file read and checked whole, every image included (None without
    `eval_generate`): called with the data checks, before the model loads, so a bad record, a
    missing image or a wrong `eval_generate_image_folder` fails the run in a second, not at
    its first evaluation (ValueError naming --eval-generate, the file, the record and the
    field). Images follow the run's `allow_images_outside_folder`, as the training records."""
    if not config.eval_generate:
        return None
    try:
        return read_qa_set(config.eval_generate, config.eval_generate_image_folder,
                           allow_outside=config.allow_images_outside_folder,
                           allow_hint="--set allow_images_outside_folder=true")
    except ValueError as err:
        raise ValueError(f"--eval-generate {config.eval_generate}: {err}") from None


def shard(records: Sequence[QARecord], rank: int, world: int) -> list[tuple[int, bool]]:
    """The records `rank` answers, in order, as (position, counted): every `world`-th record
    with images from `rank`, then every `world`-th text-only one, each part padded with
    uncounted copies to its longest shard. So every rank makes the same generate calls, and
    each call has images on every rank or on none: under ZeRO-3 a rank that skipped the vision
    tower's forward would leave the others waiting for its share of the tower's weights."""
    out: list[tuple[int, bool]] = []
    for with_images in (True, False):
        positions = [i for i, r in enumerate(records) if bool(r.images) == with_images]
        mine = positions[rank::world]
        out += [(i, True) for i in mine]
        missing = -(-len(positions) // world) - len(mine)
        if missing:
            out += [((mine or positions)[-1], False)] * missing
    return out


class EvaluatingTrainer(LlavaTrainer):
    """`LlavaTrainer` whose evaluations also answer the QA file named by `args.eval_generate`
    (without it, `LlavaTrainer` exactly)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        given = self._setting("eval_generate", None)
        # Checked whole before the model loaded (`check_qa_set`, with the run's own
        # allow_images_outside_folder); the QA set given as the evaluation dataset is that one.
        if isinstance(self.eval_dataset, QASet) or not given:
            self.qa_set = self.eval_dataset if given else None
        else:
            self.qa_set = read_qa_set(given, self._setting("eval_generate_image_folder", None),
                                      allow_outside=True, check_images=False)
        self.qa_answers: list[str] = []  # the last evaluation's answers, in record order

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's evaluation with `<prefix>_accuracy` among its metrics; with the QA
        set as the evaluation dataset (no held-out records), the answers alone."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.qa_set is None or not isinstance(dataset, QASet):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        start = time.time()
        metrics = self.answer_qa_set(metric_key_prefix)
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics)
        return metrics

    def evaluation_loop(self, dataloader: Any, description: str,
                        prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None,
                        metric_key_prefix: str = "eval") -> Any:
        """The Trainer's loop over the held-out records; an evaluation (not a prediction) then
        answers the QA set, so eval_accuracy is logged in the same entry as eval_loss."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                         ignore_keys, metric_key_prefix)
        if self.qa_set is not None and description == "Evaluation":
            output.metrics.update(self.answer_qa_set(metric_key_prefix))
        return output

    def answer_qa_set(self, prefix: str = "eval") -> dict[str, float]:
        """Answer every QA record with the model as it is now (this rank's shard), gather the
        answers and score them: the accuracy metrics ({} without a QA set). Collective under
        torch.distributed: call it on every rank."""
        if self.qa_set is None:
            return {}
        qa, world = self.qa_set, self.args.world_size
        mine = shard(qa.records, self.args.process_index, world)
        replies = self._answer(qa, [qa.records[i] for i, _ in mine])
        answers = dict(_gathered([(i, reply) for (i, counted), reply
                                  in zip(mine, replies, strict=True) if counted], world))
        self.qa_answers = [answers[i] for i in range(len(qa))]
        return accuracy_metrics(tally_answers(qa.records, self.qa_answers), prefix)

    def _answer(self, qa: QASet, records: list[QARecord]) -> list[str]:
        model = self.model
        generator = Generator(model, self.processing_class, self._setting("template", None),
                              self._setting("image_aspect_ratio", "square"))
        training = model.training
        model.eval()  # no dropout: the answers of the weights as they are, as evaluate gives
        try:
            return list(answer_questions(
                generator, records, qa.image_folder,
                self._setting("eval_generate_max_new_tokens", 64),
                self.args.per_device_eval_batch_size))
        finally:
            model.train(training)


def _gathered(pairs: list[tuple[int, str]], world: int) -> list[tuple[int, str]]:
    """Every rank's (position, answer) pairs, on every rank."""
    if world <= 1:
        return pairs
    import torch.distributed as dist

    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, pairs)
    return [pair for rank_pairs in everyone for pair in rank_pairs]
