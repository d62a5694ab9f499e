"""The HF Trainer with what LLaVA training needs and nothing patched in the library.

- parameter groups: the projector and the vision tower may have their own learning rates
  (logged as `learning_rate_<component>` beside the LLM's `learning_rate`);
- `group_by_modality_length` sampling, and `group_by_length` by the index's lengths;
- the loss at supervised positions only (`train.supervised_loss`), switchable;
- checkpoints that are complete or absent (`train.checkpoints`);
- projector-only runs checkpoint only the projector (not a copy of the frozen LLM);
- resume that really restores the weights: transformers 5 saves LLaVA checkpoints under the
  legacy on-disk key names but its resume loads them without renaming, so every key is
  "missing" and training silently continues from the base weights. We reload through
  `from_pretrained`, which knows the mapping, and copy the weights in strictly. The same for
  `load_best_model_at_end`, whose loader has the same blind spot.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from llava_cli.artifacts.files import full_disk_named
from llava_cli.artifacts.manifest import OutputKind
from llava_cli.artifacts.output_dir import CHECKPOINT_PREFIX
from llava_cli.artifacts.projector_file import PROJECTOR_FILE, write_projector_file
from llava_cli.data.batching.sampler import ModalityLengthGroupedSampler
from llava_cli.data.conversation import RecordError
from llava_cli.data.problems import Dropped, ProblemCounter
from llava_cli.model.load import load_pretrained
from llava_cli.model.parts import components, trains_input_embeddings
from llava_cli.model.projector import load_projector_weights, projector_state
from llava_cli.train.checkpoints import (
    TRAINER_STATE,
    discard_staging,
    publish_checkpoint,
    staging_root,
)
from llava_cli.train.feature_cache import feature_cache_for
from llava_cli.train.supervised_loss import (
    shifted_cross_entropy,
    supervised_cross_entropy,
    supervised_positions,
)

COMPONENT_ORDER = ("llm", "projector", "vision_tower")  # parameter groups, in this order


def _loss_function(keep_supervised_logits: bool, label_smoothing: float) -> Any:
    """Our loss for the Trainer, or None for the model's own (plain path, no smoothing)."""
    if keep_supervised_logits:
        loss = supervised_cross_entropy
    elif label_smoothing:  # the Trainer's smoother would not shift LLaVA's labels
        loss = shifted_cross_entropy
    else:
        return None
    return partial(loss, label_smoothing=label_smoothing) if label_smoothing else loss


def _raise_record_errors(inputs: dict[str, Any]) -> None:
    if errors := inputs.pop("record_errors", None):
        raise RecordError(*errors[0])


class LlavaTrainer(Trainer):
    """Trainer for LLaVA models. Takes the Trainer's own arguments only: its settings come
    from `args`, a `train.arguments.LlavaTrainingArguments` (plain TrainingArguments give
    transformers' behaviour: one learning rate, the full-logits loss, full checkpoints)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._staging_run_dir: str | None = None  # set while a checkpoint is being written
        super().__init__(*args, **kwargs)
        # Liger's fused linear cross-entropy needs the labels in the model call; with it on,
        # the plain path is the fast one.
        self.keep_supervised_logits = (self._setting("supervised_logits_only", False)
                                       and not self.args.use_liger_kernel)
        loss = _loss_function(self.keep_supervised_logits, self.args.label_smoothing_factor)
        if loss is not None:
            self.compute_loss_func = loss
        self.output_kind = OutputKind(self._setting("output_kind", OutputKind.FULL))
        self.projector_lr = self._setting("projector_lr", None)
        self.vision_tower_lr = self._setting("vision_tower_lr", None)
        self.group_by_modality = self._setting("group_by_modality_length", False)
        self.feature_cache = feature_cache_for(self.model, self.args)  # None: no cache asked
        # Records the dataset dropped on this rank, by position: bounded by distinct records,
        # however many epochs meet them again.
        self._dropped: dict[int, Dropped] = {}

    def _setting(self, name: str, default: Any) -> Any:
        return getattr(self.args, name, default)

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step; first takes note of the records dropped to fill this batch, and
        raises the error of a bad record met in a dataloader worker."""
        _raise_record_errors(inputs)
        self._dropped.update((drop.position, drop) for drop in inputs.pop("dropped_records", ()))
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """The Trainer's evaluation step (records dropped from evaluation are not totalled)."""
        _raise_record_errors(inputs)
        inputs.pop("dropped_records", None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def dropped_records(self) -> ProblemCounter:
        """Distinct records dropped from training so far, over all ranks and their dataloader
        workers. Collective under torch.distributed: call it on every rank."""
        import torch.distributed as dist

        drops: list[Any] = list(self._dropped.values())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, drops)
            drops = [Dropped(*drop) for rank in gathered for drop in rank]
        return ProblemCounter.of_distinct(drops)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss, without a KV cache; with supervised-only logits, the model
        projects only the positions whose next token is supervised (`supervised_cross_entropy`
        takes it from there, with the Trainer's normalisation and gradient accumulation)."""
        # A training forward never needs a KV cache, and with one transformers ignores the
        # per-sample position ids of padding-free rows (samples would attend to each other).
        inputs = {**inputs, "use_cache": False}
        inputs = self.feature_cache.model_inputs(model, inputs) if self.feature_cache else inputs
        if self.keep_supervised_logits and "labels" in inputs:
            inputs["logits_to_keep"] = supervised_positions(inputs["labels"])
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        by_length = self.args.train_sampling_strategy == "group_by_length"
        if not (self.group_by_modality or by_length):
            return super()._get_train_sampler(train_dataset)
        # transformers' own group_by_length measures each sample by loading it (every record
        # tokenized, every image decoded before the first step), by the processor's first
        # input name: "pixel_values" for LLaVA, a KeyError. The record index has the lengths;
        # unsigned, they are one "modality" to our seeded, resumable sampler.
        lengths = dataset.modality_lengths if self.group_by_modality else dataset.lengths
        return ModalityLengthGroupedSampler(
            lengths, self.args.per_device_train_batch_size,
            self.args.world_size * self.args.gradient_accumulation_steps, seed=self.args.seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # Evaluation order does not matter; transformers' group_by_length one would load (and
        # fail on) every held-out sample as above.
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

    def parameter_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters grouped by (component, learning rate, weight decay)."""
        parts = components(model)
        special = {id(p): ("projector", self.projector_lr) for p in parts.projector.parameters()}
        special.update({id(p): ("vision_tower", self.vision_tower_lr)
                        for p in parts.vision_tower.parameters()})
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, float, float], list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            part, lr = special.get(id(param), ("llm", None))
            key = (part, lr or self.args.learning_rate,
                   self.args.weight_decay if name in decay else 0.0)
            groups.setdefault(key, []).append(param)
        # The LLM's groups first: the Trainer logs group 0's rate as "learning_rate", which
        # must be the configured one, not the projector's (LLaVA's LoRA recipe: 2e-4 vs 2e-5).
        ordered = sorted(groups.items(), key=lambda item: COMPONENT_ORDER.index(item[0][0]))
        return [{"params": params, "lr": lr, "weight_decay": wd, "name": part}
                for (part, lr, wd), params in ordered]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus `learning_rate_<component>` for each component whose rate
        differs from the logged `learning_rate` (the Trainer reports group 0's alone)."""
        if "learning_rate" in logs and self.lr_scheduler is not None:
            logs = {**logs, **self._other_learning_rates(logs["learning_rate"])}
        super().log(logs, *args, **kwargs)

    def _other_learning_rates(self, logged: float) -> dict[str, float]:
        # `logged` is the rate the step used (taken before the scheduler stepped). The HF
        # schedules are LambdaLR: one factor for every group, so each group's rate of that
        # step is `logged` scaled by its initial rate over group 0's.
        groups = self.optimizer.param_groups
        initial = [group.get("initial_lr", group["lr"]) for group in groups]
        if not initial[0]:
            return {}
        return {f"learning_rate_{group['name']}": logged * rate / initial[0]
                for group, rate in zip(groups, initial, strict=True)
                if "name" in group and rate != initial[0]}

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """AdamW (or the configured optimizer) over our parameter groups."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(self.parameter_groups(opt_model), **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.output_kind != OutputKind.PROJECTOR:
            return super()._save(output_dir, state_dict)
        # Under DeepSpeed `state_dict` arrives gathered on every rank; else gather here
        # (a collective under ZeRO-3, so before the rank check).
        state = projector_state(self.model, state_dict, trains_input_embeddings(self.model))
        if not self.args.should_save:
            return None
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        write_projector_file(state, os.path.join(output_dir, PROJECTOR_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        return None

    def save_full_copy(self, output_dir: str) -> None:
        """Save the whole model (HF layout) whatever the output kind; call on every rank."""
        state = self.accelerator.get_state_dict(self.deepspeed) if self.is_deepspeed_enabled \
            else None
        Trainer._save(self, output_dir, state_dict=state)

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # transformers takes a step before it checks the step budget, so resuming a finished
        # run (its last checkpoint at max_steps) would train one step past it.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being saved, the Trainer writes under its staging folder.
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, written under a hidden name and renamed into place once
        every rank has finished it (`train.checkpoints`): complete or absent, never half."""
        run_dir, step = super()._get_output_dir(trial), self.state.global_step
        self._staging_run_dir = str(staging_root(run_dir, step))
        try:
            with full_disk_named(run_dir):
                super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's shards are written
        except BaseException:
            if self.args.should_save:  # a full disk: free what the partial one took
                discard_staging(run_dir, step)
            raise
        finally:
            self._staging_run_dir = None
        if self.args.should_save:
            self._publish_checkpoint(run_dir, step)
        self.accelerator.wait_for_everyone()  # no rank goes on before it is in place

    def _publish_checkpoint(self, run_dir: str, step: int) -> None:
        published = publish_checkpoint(run_dir, step)
        best = self.state.best_global_step
        if best:  # the Trainer looked for the best checkpoint in the staging folder
            found = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{best}")
            self.state.best_model_checkpoint = found if os.path.isdir(found) else None
            self.state.save_to_json(str(published / TRAINER_STATE))
        rotate_checkpoints(run_dir, self.args.save_total_limit,
                           self.state.best_model_checkpoint, use_mtime=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = self.model if model is None else model
        if self.output_kind == OutputKind.PROJECTOR:
            load_projector_weights(model, os.path.join(resume_from_checkpoint, PROJECTOR_FILE),
                                   "all")
        elif self._library_loads_checkpoints:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self._load_full_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        # `load_best_model_at_end`: transformers' own loader has resume's blind spots (legacy
        # key names of full LLaVA checkpoints, projector-only checkpoints) and silently keeps
        # the last weights; the same loading as resume instead.
        if self._library_loads_checkpoints:
            return super()._load_best_model()
        return self._load_from_checkpoint(self.state.best_model_checkpoint)

    @property
    def _library_loads_checkpoints(self) -> bool:
        # PEFT adapters, DeepSpeed and FSDP checkpoints load correctly the library's way.
        return (self.output_kind == OutputKind.LORA or self.is_deepspeed_enabled
                or self.is_fsdp_enabled)

    @staticmethod
    def _load_full_checkpoint(checkpoint: str, model: Any) -> None:
        # Strict: a damaged checkpoint is an error naming it, never random weights resumed.
        reloaded = load_pretrained(type(model), checkpoint, "checkpoint",
                                   "resume from an earlier complete checkpoint",
                                   dtype=model.dtype)
        state = reloaded.state_dict()
        with torch.no_grad():
            model.load_state_dict(state, strict=True)
        del reloaded, state
