"""Answering prompts with a trained model: load a run's output, build the training prompt, decode.

The prompt comes from the processor's chat template, which training saved to render the
training template (see `training.attach_chat_template`), so inference sees exactly the text
the model was trained on. Images get the run's `image_aspect_ratio` policy (LLaVA's `pad`
pads to a square with the mean colour), as training did. Decoding is greedy: the same inputs
always give the same answer.
"""

from __future__ import annotations

import json
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.manifest import read_manifest
from llava_cli.templates import IMAGE_PLACEHOLDER, TEMPLATES

DEFAULT_MAX_NEW_TOKENS = 64
_TEMPLATE_MARKER = re.compile(r"llava_cli template: ([\w-]+)")
# Per tokenizer: (stop string, extra EOS ids, stopping criteria); built once, reused per call.
_STOP_CACHE: weakref.WeakKeyDictionary[Any, tuple[str, list[int], Any]] = (
    weakref.WeakKeyDictionary())


@dataclass
class Generator:
    """A loaded model with what answering needs: processor, template and image policy."""

    model: Any
    processor: Any
    template: str | None  # the training template (None: a checkpoint without our manifest)
    image_aspect_ratio: str = "square"

    def answer(self, image: Any, prompt: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               stream: bool = False) -> str:
        """`answer(...)` with this model's settings."""
        return answer(self.model, self.processor, image, prompt, max_new_tokens,
                      template=self.template, image_aspect_ratio=self.image_aspect_ratio,
                      stream=stream)

    def __iter__(self) -> Any:
        """Unpacks as `model, processor, template`."""
        return iter((self.model, self.processor, self.template))


def load_for_generation(checkpoint: str | Path, adapter: str | Path | None = None,
                        device: str | None = None) -> Generator:
    """Load a `finetune` output, a LoRA run (its base + adapter) or any LLaVA checkpoint.

    `adapter` applies a LoRA run directory to `checkpoint` as its base. A `pretrain` output
    is refused: it holds only the projector, the LLM never learnt to answer.
    """
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint) if checkpoint.is_dir() else None
    if manifest is not None and manifest.kind == "projector":
        raise ValueError(
            f"{checkpoint} is a pretrain output (manifest kind 'projector'): it has a trained "
            "projector but no trained LLM, so it cannot answer prompts; generate with the "
            "output of `llava finetune` (or `llava lora`) instead")
    if adapter is None and (manifest is None or manifest.kind == "lora") and (
            checkpoint / "adapter_config.json").is_file():
        adapter, checkpoint = checkpoint, _adapter_base(checkpoint, manifest)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint}: not a model checkpoint (no config.json)")
    model = _load_model(checkpoint, device)
    settings = read_manifest(adapter) if adapter is not None else manifest
    processor_dir = adapter if adapter is not None and _has_processor(Path(adapter)) else checkpoint
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    processor = _load_processor(processor_dir)
    template = settings.template if settings else template_of(processor)
    ratio = settings.image_aspect_ratio if settings else "square"
    return Generator(model, processor, template, ratio)


def _adapter_base(run_dir: Path, manifest: Any) -> Path:
    """The checkpoint a LoRA run applies to: its manifest's base, else PEFT's record of it."""
    if manifest is not None:
        base = manifest.base
        if base.get("type") != "llava" or not base.get("path"):
            raise ValueError(f"{run_dir}: its base is built from parts ({base}); merge it with "
                             "`llava merge-lora` or pass the base checkpoint with --adapter")
        path = Path(base["path"])
        path = path if path.is_absolute() else run_dir / path
    else:
        config = json.loads((run_dir / "adapter_config.json").read_text())
        path = Path(config.get("base_model_name_or_path") or "")
    if not (path / "config.json").is_file():
        raise ValueError(f"{run_dir}: the LoRA base checkpoint {str(path)!r} is not there; pass "
                         "the base as CHECKPOINT and this run with --adapter")
    return path


def _has_processor(folder: Path) -> bool:
    return (folder / "processor_config.json").is_file() or (
        folder / "preprocessor_config.json").is_file()


def _load_model(path: Path, device: str | None) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path))
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{path}: the processor has no chat template, so the training prompt "
                         "format is unknown; save one with the processor")
    return processor


def template_of(processor: Any) -> str | None:
    """The llava_cli template a processor's chat template was generated from, if any."""
    found = _TEMPLATE_MARKER.search(getattr(processor, "chat_template", None) or "")
    return found.group(1) if found else None


def build_prompt(processor: Any, prompt: str, images: int = 1) -> str:
    """The chat-template text for one user turn (`images` image items, then `prompt`)."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def prepare_inputs(model: Any, processor: Any, images: list[Any], prompt: str,
                   image_aspect_ratio: str = "square") -> Any:
    """Tokenized prompt and pixel values on the model's device, images as in training."""
    from llava_cli.images import prepare_image

    mean = processor.image_processor.image_mean
    images = [prepare_image(im.convert("RGB"), image_aspect_ratio, mean) for im in images]
    text = build_prompt(processor, prompt, len(images))
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _stops(tokenizer: Any, template: str | None) -> tuple[str, list[int], Any]:
    """The template's stop string, as extra EOS ids when it is one token, else a criterion."""
    stop = TEMPLATES[template].stop if template in TEMPLATES else ""
    cached = _STOP_CACHE.get(tokenizer)
    if cached is not None and cached[0] == stop:
        return cached
    ids = tokenizer.encode(stop, add_special_tokens=False) if stop else []
    criteria = None
    if len(ids) > 1:  # several tokens: match the decoded text (StopStringCriteria precomputes)
        from transformers import StoppingCriteriaList, StopStringCriteria

        criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, [stop])])
        ids = []
    _STOP_CACHE[tokenizer] = (stop, ids, criteria)
    return stop, ids, criteria


def generation_kwargs(processor: Any, template: str | None, max_new_tokens: int
                      ) -> dict[str, Any]:
    """Greedy decoding that stops at EOS or the template's end-of-turn string."""
    tokenizer = processor.tokenizer
    _, extra_eos, criteria = _stops(tokenizer, template)
    eos = [tokenizer.eos_token_id, *extra_eos] if tokenizer.eos_token_id is not None else extra_eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1,
            "eos_token_id": eos, "pad_token_id": pad, "stopping_criteria": criteria}


def clean_answer(text: str, template: str | None) -> str:
    """Cut the generated text at the template's stop string and trim whitespace."""
    stop = TEMPLATES[template].stop if template in TEMPLATES else ""
    if stop and stop in text:
        text = text[: text.index(stop)]
    return text.strip()


def answer(model: Any, processor: Any, image: Any, prompt: str,
           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, *, template: str | None = None,
           image_aspect_ratio: str = "square", stream: bool = False) -> str:
    """Greedy answer to `prompt` about `image` (a PIL image, or None for a text-only prompt).

    `template` defaults to the one named in the processor's chat template (its stop string
    ends the answer). `stream` prints tokens to stdout as they come. Nothing is reloaded or
    rebuilt between calls, so it is cheap in a loop.
    """
    import torch

    template = template or template_of(processor)
    images = [] if image is None else (list(image) if isinstance(image, list | tuple)
                                       else [image])
    inputs = prepare_inputs(model, processor, images, prompt, image_aspect_ratio)
    kwargs = generation_kwargs(processor, template, max_new_tokens)
    if stream:
        kwargs["streamer"] = _streamer(processor.tokenizer, template)
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return clean_answer(processor.tokenizer.decode(new_tokens, skip_special_tokens=True),
                        template)


def _streamer(tokenizer: Any, template: str | None) -> Any:
    """A TextStreamer that prints to stdout but never the template's stop string."""
    from transformers import TextStreamer

    stop = TEMPLATES[template].stop if template in TEMPLATES else ""

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


def record_prompt(record: dict[str, Any], position: int) -> tuple[str, str, list[str], str | None]:
    """(id, prompt text, image paths, reference) of a LLaVA record's first exchange."""
    from llava_cli.conversation import parse_record

    turns = record.get("conversations") if isinstance(record, dict) else None
    open_question = isinstance(turns, list) and len(turns) == 1  # a prompt with no reply yet
    if open_question:  # parse_record would drop the unanswered turn: give it an empty reply
        record = {**record, "conversations": [*turns, {"from": "gpt", "value": ""}]}
    conv = parse_record(record, position)
    first = conv.messages[0].content.replace(IMAGE_PLACEHOLDER, "").strip()
    reference = None if open_question else next(
        (m.content for m in conv.messages if m.role == "assistant"), None)
    return conv.record_id, first, conv.images, reference


def answer_records(generator: Generator, data: str | Path, output: str | Path,
                   image_folder: str | Path | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True) -> int:
    """Answer the first human turn of every record of `data`; write JSON lines to `output`.

    Each line: `{"id", "prompt", "answer", "reference"}` (reference: the first gpt turn, or
    null). Images are resolved against `image_folder` (default: the data file's folder).
    Returns the number of records answered.
    """
    from llava_cli.images import load_image, resolve_image_path
    from llava_cli.records import RecordIndex

    index = RecordIndex.open(data)
    folder = image_folder if image_folder is not None else Path(data).resolve().parent
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")  # OUT appears only when complete
    with open(partial, "w") as out, _progress(progress, len(index)) as advance:
        for i in range(len(index)):
            rid, prompt, paths, reference = record_prompt(index.read(i), i)
            images = [load_image(resolve_image_path(folder, p), label=p) for p in paths]
            reply = generator.answer(images or None, prompt, max_new_tokens)
            out.write(json.dumps({"id": rid, "prompt": prompt, "answer": reply,
                                  "reference": reference}) + "\n")
            out.flush()
            advance()
    partial.replace(output)
    return len(index)


class _progress:  # noqa: N801 - used like a function
    """A rich progress bar on stderr (or nothing), yielding a callable that advances it."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=False)
        self.bar.start()
        task = self.bar.add_task("answering", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
