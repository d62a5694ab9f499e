"""Trainer callbacks of ours."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class FrozenPartsNoBackward(TrainerCallback):
    """A frozen vision tower gets no backward pass and no checkpoint recompute.

    With gradient checkpointing on, transformers hooks the input embeddings of every
    sub-model to require grad (needed by reentrant checkpointing only) — the vision tower's
    patch embedding included, so a frozen tower builds a full backward graph and, when
    checkpointed, runs its forward twice, all for gradients nobody reads. Our checkpointing is
    non-reentrant (`train.arguments`), which needs no such hook: trainable weights inside a
    checkpointed block get their gradients anyway. So the hooks are removed once the Trainer
    has set checkpointing up; a frozen tower then runs like under `no_grad`.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        kwargs_given = args.activation_checkpointing_kwargs  # none: transformers' non-reentrant
        reentrant = kwargs_given.get("use_reentrant", True) if kwargs_given else False
        if model is None or not args.activation_checkpointing or reentrant:
            return
        from llava_cli.model.parts import base_model

        base_model(model).disable_input_require_grads()
