"""Checking a merged model: a probe batch, its logits, and the tolerances they must meet.

Tolerances are `atol + rtol * max|reference logit|`: logits of real models reach ±30, where
one bf16 step is 0.125, so a purely absolute bound would fail every correct bf16 merge.

- float32: merged `W + BA` vs the unmerged `Wx + B(Ax)` differ only by float32 rounding
  (measured 2.4e-7 on tiny models): atol 1e-4, rtol 1e-5.
- bfloat16 / float16: both sides round in every layer, differently (the merged weight is
  rounded once, the unmerged path rounds two products). About 4 steps of the format:
  bf16 (step 2^-8 relative) atol 5e-2, rtol 3e-2; fp16 (step 2^-11) atol 5e-2, rtol 4e-3.
- QLoRA, merged vs the *quantized* base + adapter it was trained on: the merge deliberately
  goes into the full-precision base, so this difference is the base's quantization error,
  not a merge error (measured max 0.065 for 4-bit nf4, 0.0056 for 8-bit on tiny models).
  4-bit: atol 0.1, rtol 0.1; 8-bit: atol 2e-2, rtol 2e-2 — loose, they only catch a wrong
  base (another checkpoint, a different vocabulary) or a broken adapter. The exact merge
  check for QLoRA is the first one: merged vs unquantized base + the same adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROBE_QUESTION = "What is in this picture? Answer in one word."
PROBE_ANSWER = " A square."
_TOLERANCES = {("float32", 16): (1e-4, 1e-5), ("bfloat16", 16): (5e-2, 3e-2),
               ("float16", 16): (5e-2, 4e-3), (4,): (1e-1, 1e-1), (8,): (2e-2, 2e-2)}


class VerificationError(RuntimeError):
    """A written model does not reproduce its source's logits within the tolerance: nothing
    was published. Not bad input and not a defect: the command boundary prints the message
    (with the failed checks) and exits 1."""


@dataclass
class Check:
    """One logits comparison."""

    against: str
    max_abs_diff: float
    tolerance: float
    ok: bool

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"verify vs {self.against}: max |logit diff| {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}) {verdict}")


def tolerance(dtype: str, bits: int) -> tuple[float, float]:
    """(atol, rtol) for a merged model in `dtype` against a base loaded with `bits`."""
    return _TOLERANCES[(dtype, 16)] if bits == 16 else _TOLERANCES[(bits,)]


def compare(against: str, logits: Any, reference: Any, atol_rtol: tuple[float, float]) -> Check:
    """Max absolute difference of two logits tensors against `atol + rtol * max|ref|`."""
    atol, rtol = atol_rtol
    reference = reference.float()
    diff = float((logits.float() - reference).abs().max())
    bound = atol + rtol * float(reference.abs().max())
    return Check(against, diff, bound, diff <= bound)


def probe_image() -> Any:
    """A deterministic synthetic RGB image (colour gradients and a square)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 40))
    image.putdata([(x * 5, y * 6, (x + y) * 3) for y in range(40) for x in range(48)])
    ImageDraw.Draw(image).rectangle((12, 10, 30, 28), fill=(230, 30, 30))
    return image


def probe_batch(processor: Any) -> dict[str, Any]:
    """One image + text sample, prompted with the processor's chat template (the way the
    model is used at inference), with an answer so every position is compared."""
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": PROBE_QUESTION}]}]
    if getattr(processor, "chat_template", None):
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
    else:  # a processor saved without a template: LLaVA v1's shape
        prompt = f"USER: {processor.image_token}\n{PROBE_QUESTION} ASSISTANT:"
    return dict(processor(images=probe_image(), text=prompt + PROBE_ANSWER,
                          return_tensors="pt"))


def probe_logits(model: Any, batch: dict[str, Any]) -> Any:
    """Float32 logits of `model` on `batch` (pixel values cast to the vision tower's dtype)."""
    import torch

    from llava_cli.model.parts import components

    dtype = next(components(model).vision_tower.parameters()).dtype
    inputs = {k: v.to(dtype) if k == "pixel_values" else v
              for k, v in batch.items()}
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()
