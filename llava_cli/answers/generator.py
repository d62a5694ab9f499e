"""Answering prompts with a trained model: the training prompt, the training images, decoding
that stops at the end of the turn — greedy unless a `Sampling` asks otherwise.

The prompt comes from the processor's chat template, which training saved to render the
training template (`data.text.chat_template.attach_chat_template`), so inference sees exactly
the text the model was trained on. Images go through the one `ImageLoader` training used
(transparency onto the mean colour, then the run's `image_aspect_ratio`: LLaVA's `pad` pads to
a square with the mean colour). Greedy decoding (the default) gives the same answer to the same
inputs; sampling with a seed gives the same answers on the same machine and library versions.
A conversation of several turns renders each through the same chat template (`Conversation`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from llava_cli.data.images import ImageLoader
from llava_cli.data.text.stops import template_stop
from llava_cli.data.text.templates import template_named

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn: temperature 0 is greedy (the default, one answer); above 0 each
    of `answers` answers is sampled with `top_p` / `top_k` (None: off), from `seed` when given."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    answers: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be above 0 and at most 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k {self.top_k}: must be at least 1")
        if self.answers < 1:
            raise ValueError(f"--num-answers {self.answers}: must be at least 1")
        if self.answers > 1 and self.temperature == 0:
            raise ValueError(f"--num-answers {self.answers}: greedy decoding gives one answer; "
                             "set --temperature above 0 to sample several")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            raise ValueError("--top-p / --top-k shape sampling; set --temperature above 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def kwargs(self) -> dict[str, Any]:
        """The `generate` arguments of this way of drawing."""
        if self.greedy:
            return {"do_sample": False, "num_beams": 1}
        out: dict[str, Any] = {"do_sample": True, "temperature": self.temperature,
                               "num_return_sequences": self.answers, "num_beams": 1,
                               "top_p": 1.0 if self.top_p is None else self.top_p,
                               "top_k": 0 if self.top_k is None else self.top_k}
        return out


GREEDY = Sampling()


@dataclass(frozen=True)
class Stops:
    """Where a template's turn ends: its stop string, as extra EOS ids when it is one token,
    else as a stopping criterion on the decoded text."""

    text: str
    extra_eos: list[int]
    criteria: Any = None


def template_stops(tokenizer: Any, template: str | None) -> Stops:
    """The stops of `template` (none for an unknown one) with `tokenizer`."""
    stop, ids = template_stop(tokenizer, template)
    if ids or not stop:
        return Stops(stop, ids)
    # Several tokens: match the decoded text (StopStringCriteria precomputes its tables).
    from transformers import StoppingCriteriaList, StopStringCriteria

    return Stops(stop, [], StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])]))


def generation_kwargs(processor: Any, template: str | None, max_new_tokens: int,
                      stops: Stops | None = None, sampling: Sampling = GREEDY
                      ) -> dict[str, Any]:
    """Decoding (greedy unless `sampling` says otherwise) that stops at EOS or the template's
    end-of-turn string."""
    tokenizer = processor.tokenizer
    stops = stops or template_stops(tokenizer, template)
    eos = [tokenizer.eos_token_id, *stops.extra_eos] if tokenizer.eos_token_id is not None \
        else stops.extra_eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # tokenizer: the saved generation config may hold stop_strings, which need it
    return {"max_new_tokens": max_new_tokens, **sampling.kwargs(),
            "eos_token_id": eos, "pad_token_id": pad, "stopping_criteria": stops.criteria,
            "tokenizer": tokenizer}


def clean_answer(text: str, template: str | None) -> str:
    """Cut the generated text at the template's stop string and trim whitespace."""
    named = template_named(template)  # aliases too (a saved `vicuna_v1`)
    stop = named.stop if named else ""
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()


def build_prompt(processor: Any, prompt: str, images: int = 1) -> str:
    """The chat-template text for one user turn (`images` image items, then `prompt`)."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


@dataclass
class Conversation:
    """The turns of a chat so far: (role, text, images attached to that turn). Rendered whole
    through the training chat template, as training rendered multi-turn records."""

    turns: list[tuple[str, str, int]] = field(default_factory=list)

    def ask(self, text: str, images: int = 0) -> None:
        self.turns.append(("user", text, images))

    def reply(self, text: str) -> None:
        self.turns.append(("assistant", text, 0))

    def reset(self) -> None:
        self.turns.clear()

    def render(self, processor: Any) -> str:
        messages = [{"role": role, "content": [{"type": "image"}] * images
                     + [{"type": "text", "text": text}]}
                    for role, text, images in self.turns]
        return processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)


@dataclass
class Generator:
    """A loaded model with what answering needs: processor, template and image policy.

    Nothing is reloaded or rebuilt between calls (the stops are worked out once), so it is
    cheap in a loop.
    """

    model: Any
    processor: Any
    template: str | None  # the training template (None: a checkpoint without our manifest)
    image_aspect_ratio: str = "square"
    images: ImageLoader = field(init=False)

    def __post_init__(self) -> None:
        mean = tuple(self.processor.image_processor.image_mean)
        self.images = ImageLoader(self.image_aspect_ratio, mean)

    @cached_property
    def stops(self) -> Stops:
        """The training template's stops for this tokenizer."""
        return template_stops(self.processor.tokenizer, self.template)

    def answer(self, image: Any, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               stream: bool = False) -> str:
        """Greedy answer to `prompt` about `image`: a PIL image, an image file path, a list of
        either, or None for a text-only prompt. `stream` prints tokens to stdout as they come.
        """
        return self.answers(image, prompt, max_new_tokens, GREEDY, stream)[0]

    def answers(self, image: Any, prompt: str | Conversation,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: Sampling = GREEDY,
                stream: bool = False) -> list[str]:
        """`sampling.answers` answers to `prompt` (one user turn, or a whole `Conversation`
        whose images are `image`, in turn order); `stream` prints the first as it comes."""
        import torch

        inputs = self.inputs(_as_list(image), prompt)
        kwargs = generation_kwargs(self.processor, self.template, max_new_tokens, self.stops,
                                   sampling)
        if stream and sampling.answers == 1:
            kwargs["streamer"] = _streamer(self.processor.tokenizer, self.stops.text)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [clean_answer(text, self.template) for text in texts]

    def answer_batch(self, asks: list[tuple[list[Any], str]],
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
        """Greedy answers to several (images, prompt) asks in one generate call: the prompts
        padded on the left with an attention mask, so each answer is the one `answer` gives
        alone. The KV cache is on even when a training run turned it off in the config."""
        import torch

        inputs = self.inputs([im for images, _ in asks for im in images],
                             [prompt for _, prompt in asks], [len(images) for images, _ in asks])
        kwargs = generation_kwargs(self.processor, self.template, max_new_tokens, self.stops)
        with torch.no_grad():
            output = self.model.generate(**inputs, **kwargs, use_cache=True)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [clean_answer(text, self.template) for text in texts]

    def inputs(self, images: list[Any], prompt: str | list[str] | Conversation,
               counts: list[int] | None = None) -> Any:
        """Tokenized prompt(s) and pixel values on the model's device, images as in training.
        Several prompts (`counts`: the images of each, in order) are padded on the left, where
        generation continues every row from its own last token."""
        prepared = [self.images.open(im) if isinstance(im, str | os.PathLike)
                    else self.images.prepare(im) for im in images]
        padding: dict[str, Any] = {}
        if isinstance(prompt, Conversation):
            text: Any = prompt.render(self.processor)
        elif isinstance(prompt, str):
            text = build_prompt(self.processor, prompt, len(prepared))
        else:
            text = [build_prompt(self.processor, p, n)
                    for p, n in zip(prompt, counts or [0] * len(prompt), strict=True)]
            padding = {"padding": True, "padding_side": "left"}
        inputs = self.processor(images=prepared or None, text=text, return_tensors="pt",
                                **padding)
        inputs = inputs.to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs


def _as_list(image: Any) -> list[Any]:
    if image is None:
        return []
    return list(image) if isinstance(image, list | tuple) else [image]


def _streamer(tokenizer: Any, stop: str) -> Any:
    """A TextStreamer that prints to stdout but never the template's stop string."""
    from transformers import TextStreamer

    class StopAwareStreamer(TextStreamer):
        pending, done = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if self.done:
                return
            self.pending += text
            if stop and stop in self.pending:
                self.pending, self.done = self.pending[: self.pending.index(stop)], True
            # Hold back a tail that may be the start of the stop string.
            hold = 0 if self.done or stream_end or not stop else next(
                (k for k in range(len(stop) - 1, 0, -1) if self.pending.endswith(stop[:k])), 0)
            sys.stdout.write(self.pending[: len(self.pending) - hold])
            self.pending = self.pending[len(self.pending) - hold:]
            if stream_end or self.done:
                sys.stdout.write("\n")
            sys.stdout.flush()

    return StopAwareStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
