"""Scoring the demo's models: greedy answers on the evaluation split, a stock-transformers
cross-check, and the loss-curve plot (Pillow only, so the demo needs no matplotlib).

Answers are scored by `answers.scoring`, the scorer of `llava evaluate`: exact match of the
answer's first word against the ground truth after the VQA normalisation — every question of
the shapes task has a one-word answer (see `demo.shapes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.demo.shapes import EVAL_QUESTIONS

MAX_NEW_TOKENS = 8  # one-word answers; a few spare tokens show what a wrong model rambles


@dataclass
class Scores:
    """One model's answers on the evaluation split."""

    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVAL_QUESTIONS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVAL_QUESTIONS, 0))
    answers: dict[str, str] = field(default_factory=dict)  # record id → answer

    def accuracy(self) -> dict[str, float]:
        """Accuracy per question type (0.0 for a type with no records)."""
        return {q: self.correct[q] / self.total[q] if self.total[q] else 0.0 for q in self.total}


def is_correct(reply: str, truth: str) -> bool:
    """Whether a one-word reply is right: its first word, normalised, is the truth."""
    from llava_cli.answers.scoring import exact_match, first_word

    return exact_match(first_word(reply), [truth]) == 1.0


def evaluation_records(folder: str | Path) -> list[dict[str, Any]]:
    """The evaluation split's records (`shapes.generate_split(..., kind='eval')`)."""
    return json.loads((Path(folder) / "records.json").read_text())


def question_of(record: dict[str, Any]) -> str:
    """The question text of an evaluation record (its first turn, image placeholder removed)."""
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def score(generator: Any, folder: str | Path, records: list[dict[str, Any]]) -> Scores:
    """Greedy answers of `generator` (a `generation.Generator`) to every record."""
    scores = Scores()
    images: dict[str, Any] = {}
    for record in records:
        name = record["image"]
        if name not in images:  # three questions per picture: decode the PNG once
            images[name] = generator.images.decode(Path(folder) / name)
        reply = generator.answer(images[name], question_of(record), MAX_NEW_TOKENS)
        qtype = record["question_type"]
        scores.answers[record["id"]] = reply
        scores.total[qtype] += 1
        scores.correct[qtype] += is_correct(reply, record["answer"])
    return scores


def stock_answer(model_dir: str | Path, image: Any, question: str) -> str:
    """Answer with stock transformers only: LlavaForConditionalGeneration + AutoProcessor.

    The prompt comes from the saved chat template (it renders the training template). The
    image is padded to a square with the processor's mean colour first, as LLaVA's `pad`
    policy did in training (plain PIL; the stock processor itself only resizes).
    """
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    width, height = image.size
    side = max(width, height)
    fill = tuple(int(m * 255) for m in processor.image_processor.image_mean)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=square, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             tokenizer=processor.tokenizer)
    text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text.split("</s>")[0].strip()


# ---- loss curves ------------------------------------------------------------------------

PLOT_SIZE = (900, 480)
MARGIN = (70, 40, 20, 50)  # left, top, right, bottom
STAGE_COLORS = {"pretrain": (90, 90, 90), "finetune": (30, 100, 220), "lora": (220, 90, 30)}


def losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from a run's trainer_state.json log history."""
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return [(row["step"], float(row["loss"])) for row in state["log_history"] if "loss" in row]


def plot_losses(runs: dict[str, list[tuple[int, float]]], target: str | Path) -> Path:
    """Draw the stages' training losses one after another (log-scale loss) into a PNG."""
    import math

    from PIL import Image, ImageDraw

    image = Image.new("RGB", PLOT_SIZE, "white")
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN[0], MARGIN[1], PLOT_SIZE[0] - MARGIN[2], \
        PLOT_SIZE[1] - MARGIN[3]
    offsets, start = {}, 0
    for stage, points in runs.items():  # stages share one step axis, in pipeline order
        offsets[stage], start = start, start + (points[-1][0] if points else 0)
    values = [loss for points in runs.values() for _, loss in points if loss > 0]
    low = math.floor(math.log10(min(values, default=0.01)))
    high = math.ceil(math.log10(max(values, default=10.0)))
    high = max(high, low + 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        fx = step / max(start, 1)
        fy = (math.log10(max(loss, 10.0 ** low)) - low) / (high - low)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    pen.rectangle((left, top, right, bottom), outline="black")
    for decade in range(low, high + 1):
        _, y = xy(0, 10.0 ** decade)
        pen.line((left, y, right, y), fill=(225, 225, 225))
        pen.text((left - 8, y), f"{10.0 ** decade:g}", fill="black", anchor="rm")
    for stage, points in runs.items():
        color = STAGE_COLORS.get(stage, (0, 0, 0))
        line = [xy(offsets[stage] + step, loss) for step, loss in points]
        if len(line) > 1:
            pen.line(line, fill=color, width=2)
        x, _ = xy(offsets[stage], 1.0)
        pen.line((x, top, x, bottom), fill=(200, 200, 200))
        pen.text((x + 4, top + 4), stage, fill=color)
    pen.text((PLOT_SIZE[0] / 2, 12), "training loss (log scale) per stage", fill="black",
             anchor="mt")
    pen.text((PLOT_SIZE[0] / 2, PLOT_SIZE[1] - 14), f"optimizer step (total {start})",
             fill="black", anchor="mb")
    target = Path(target)
    image.save(target)
    return target
