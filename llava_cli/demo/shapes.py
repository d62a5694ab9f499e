"""The demo task: synthetic pictures of one coloured shape, and LLaVA records about them.

Each picture is a canvas (64-192 px a side) in white, gray or black with one filled circle,
square or triangle. Questions have one-word answers from a fixed vocabulary, so a tiny model
trained on these records can be scored exactly. Splits are deterministic for a seed.

Geometry: the shape's box is the s×s square at (x, y), all integers, covering pixels x..x+s-1
(columns) and y..y+s-1 (rows). The circle is the box's inscribed circle; the triangle has
vertices (x+s/2, y), (x, y+s), (x+s, y+s) in continuous coordinates, drawn inside the box's
pixels. The shape's centre is (x + s/2, y + s/2).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SplitKind = Literal["pretrain", "finetune", "lora", "eval", "dpo"]

MIN_SIDE, MAX_SIDE = 64, 192
MIN_FRACTION, MAX_FRACTION = 0.35, 0.75
LARGE_FRACTIONS = (0.6, 0.9)  # the dpo split's shapes (see `sample_shape`)
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SIDES = ("left", "right")

# Question type → question text. Answers are single lower-case words (see `answer_for`).
QUESTIONS = {
    "color": "What color is the shape?",
    "side": "Is the shape on the left or the right?",
    "background": "What color is the background?",
    "describe": "Describe the image.",
    "shape": "What shape is it?",  # taught by preference pairs alone (the dpo split)
}
EVAL_QUESTIONS = ("color", "side", "background")
ANSWERS = {"color": tuple(COLORS), "side": SIDES, "background": tuple(BACKGROUNDS)}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?",
                   "Give a short caption.", "Describe the picture briefly.")
CHAT = (
    ("Hello!", "Hello! Ask me about a picture."),
    ("Hi", "Hello! Ask me about a picture."),
    ("What can you do?", "I answer questions about pictures of shapes."),
    ("Thank you!", "You are welcome."),
)
DEFAULT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("describe",), "finetune": ("color", "side"), "lora": ("background",),
    "eval": EVAL_QUESTIONS, "dpo": ("shape",)}
REHEARSAL = ("color", "side")  # LoRA records also ask these, so the old skills are not forgotten
# Finetune records ask one question each, left/right four times as often as colour: with
# colour and left/right in equal measure (or two per record), the tiny model learns colour
# first and its left/right answer then never comes to depend on the image (measured).
FINETUNE_WEIGHTS = {"side": 0.8, "color": 0.2}
TEXT_ONLY_SHARE = 0.05
SHAPES_FILE = "shapes.json"  # each image's ground truth, written next to records.json


@dataclass(frozen=True)
class ShapeImage:
    """One picture's ground truth: canvas, background, shape, its colour and its box."""

    width: int
    height: int
    background: str  # key of BACKGROUNDS
    shape: str  # one of SHAPES
    color: str  # key of COLORS
    x: int  # the shape's s×s box starts at column x, row y
    y: int
    size: int  # s, the box side in pixels
    fraction: float  # the drawn fraction of min(width, height) that s was rounded from

    @property
    def center(self) -> tuple[float, float]:
        """The shape's centre (the centre of its box)."""
        return self.x + self.size / 2, self.y + self.size / 2

    @property
    def side(self) -> str:
        """"left" when the centre lies left of the canvas middle, else "right"."""
        return "left" if self.center[0] < self.width / 2 else "right"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def sample_shape(rng: random.Random, large: bool = False) -> ShapeImage:
    """Draw one picture's parameters (uniform choices as the module docstring says). `large`:
    a near-square canvas (sides within 25%) and a shape of LARGE_FRACTIONS of it, so that its
    outline spans several of a small tower's patches (the dpo split asks for the shape)."""
    width = rng.randint(MIN_SIDE, MAX_SIDE)
    height = rng.randint(max(MIN_SIDE, round(width / 1.25)), min(MAX_SIDE, round(width * 1.25))) \
        if large else rng.randint(MIN_SIDE, MAX_SIDE)
    background = rng.choice(tuple(BACKGROUNDS))
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    fraction = rng.uniform(*(LARGE_FRACTIONS if large else (MIN_FRACTION, MAX_FRACTION)))
    size = round(fraction * min(width, height))
    x, y = rng.randint(0, width - size), rng.randint(0, height - size)
    return ShapeImage(width, height, background, shape, color, x, y, size, fraction)


def draw(meta: ShapeImage) -> Any:
    """Render `meta` as an RGB PIL image (no anti-aliasing: colours are exact)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (meta.width, meta.height), BACKGROUNDS[meta.background])
    pen = ImageDraw.Draw(image)
    fill = COLORS[meta.color]
    # PIL's coordinates are inclusive pixel indices: the last pixel of the box is x+s-1.
    left, top, right, bottom = meta.x, meta.y, meta.x + meta.size - 1, meta.y + meta.size - 1
    if meta.shape == "circle":
        pen.ellipse((left, top, right, bottom), fill=fill)
    elif meta.shape == "square":
        pen.rectangle((left, top, right, bottom), fill=fill)
    else:
        pen.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def describe(meta: ShapeImage) -> str:
    """The caption: "a {colour} {shape} on a {background} background"."""
    return f"a {meta.color} {meta.shape} on a {meta.background} background"


def answer_for(meta: ShapeImage, question_type: str) -> str:
    """The ground-truth answer to a question type of QUESTIONS."""
    if question_type == "color":
        return meta.color
    if question_type == "side":
        return meta.side
    if question_type == "background":
        return meta.background
    if question_type == "describe":
        return describe(meta)
    if question_type == "shape":
        return meta.shape
    raise ValueError(f"unknown question type {question_type!r}; one of {', '.join(QUESTIONS)}")


def _turns(meta: ShapeImage, qtypes: Sequence[str], first_prompt: str | None = None
           ) -> list[dict[str, str]]:
    """Human/gpt turns asking `qtypes` in order; the image placeholder opens the first."""
    turns = []
    for n, qtype in enumerate(qtypes):
        question = first_prompt if (n == 0 and first_prompt) else QUESTIONS[qtype]
        turns.append({"from": "human", "value": ("<image>\n" if n == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer_for(meta, qtype)})
    return turns


def _record_question_types(rng: random.Random, kind: str, questions: Sequence[str]
                           ) -> list[str]:
    """Which questions one training record asks, in order: LoRA records are single- and
    multi-turn (rehearsal turns); finetune records ask one question, by FINETUNE_WEIGHTS."""
    if kind == "lora":
        focus = [rng.choice(tuple(questions))]
        extra = [q for q in REHEARSAL if rng.random() < 0.35]
        mixed = focus + extra
        rng.shuffle(mixed)
        return mixed
    weights = [FINETUNE_WEIGHTS.get(q, 0.0) for q in questions]
    if kind == "finetune" and sum(weights) > 0:
        return rng.choices(list(questions), weights=weights)
    count = rng.choice((1, 1, 2)) if len(questions) > 1 else 1
    return rng.sample(list(questions), min(count, len(questions)))


def _image_records(kind: str, index: int, meta: ShapeImage, image: str, rng: random.Random,
                   questions: Sequence[str]) -> list[dict[str, Any]]:
    if kind == "eval":
        return [{"id": f"eval-{index:05d}-{q}", "image": image,
                 "conversations": _turns(meta, [q]), "answer": answer_for(meta, q),
                 "question_type": q} for q in questions]
    if kind == "dpo":  # a preference pair: the right shape chosen, a wrong one rejected
        wrong = rng.choice([shape for shape in SHAPES if shape != meta.shape])
        return [{"id": f"dpo-{index:05d}", "image": image,
                 "conversations": [{"from": "human", "value": "<image>\n" + QUESTIONS["shape"]}],
                 "chosen": meta.shape, "rejected": wrong}]
    if kind == "pretrain":
        prompt = rng.choice(CAPTION_PROMPTS)
        return [{"id": f"pretrain-{index:05d}", "image": image,
                 "conversations": _turns(meta, ["describe"], prompt)}]
    qtypes = _record_question_types(rng, kind, questions)
    return [{"id": f"{kind}-{index:05d}", "image": image, "conversations": _turns(meta, qtypes)}]


def _text_only_records(kind: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    records = []
    for i in range(n):
        prompt, reply = rng.choice(CHAT)
        records.append({"id": f"{kind}-chat-{i:04d}", "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]})
    return records


def generate_split(folder: str | Path, n: int, seed: int, kind: SplitKind = "finetune",
                   questions: Sequence[str] | None = None) -> Path:
    """Write `n` pictures and their records to `folder`; returns `folder/records.json`.

    `kind`: pretrain (captions), finetune (one question per record, 80% left/right and 20%
    colour, plus ~5% text-only chat),
    lora (the background question, with colour/left-right rehearsal turns and chat), eval
    (one record per picture and question, ground truth in `answer` and `question_type`) or
    dpo (preference pairs: "What shape is it?", the right shape chosen, a wrong one rejected).
    `questions` overrides the kind's question types (keys of QUESTIONS). Image paths in the
    records are relative to `folder` (pass it as the image folder); `folder/shapes.json` holds
    each picture's ShapeImage fields. The random stream depends
    on (kind, seed), so an eval split never repeats the training pictures of the same seed.
    """
    if kind not in DEFAULT_QUESTIONS:
        raise ValueError(f"unknown split kind {kind!r}; one of {', '.join(DEFAULT_QUESTIONS)}")
    questions = tuple(questions or DEFAULT_QUESTIONS[kind])
    if unknown := [q for q in questions if q not in QUESTIONS]:
        raise ValueError(f"unknown question types {unknown}; choose from {', '.join(QUESTIONS)}")
    rng = random.Random(f"llava-shapes:{kind}:{seed}")  # str seeds are stable across runs
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    shapes: dict[str, dict[str, Any]] = {}
    for i in range(n):
        meta = sample_shape(rng, large=kind == "dpo")
        name = f"images/{kind}-{i:05d}.png"
        draw(meta).save(folder / name, compress_level=1)  # level 1: 3x faster, files tiny anyway
        shapes[name] = meta.to_dict()
        records += _image_records(kind, i, meta, name, rng, questions)
    if kind in ("finetune", "lora"):
        records += _text_only_records(kind, max(1, round(TEXT_ONLY_SHARE * n)), rng)
        rng.shuffle(records)
    (folder / SHAPES_FILE).write_text(json.dumps(shapes) + "\n")
    target = folder / "records.json"
    target.write_text(json.dumps(records, indent=1) + "\n")
    return target


def load_shapes(folder: str | Path) -> dict[str, ShapeImage]:
    """The ground truth `generate_split` wrote to `folder/shapes.json`, by image path."""
    data = json.loads((Path(folder) / SHAPES_FILE).read_text())
    return {name: ShapeImage(**fields) for name, fields in data.items()}
