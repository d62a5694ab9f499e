"""The demo task generator: determinism, the spec's ranges, exact pixels, records, eval split."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_cli.data.conversation import parse_record
from llava_cli.demo.shapes import (
    ANSWERS,
    BACKGROUNDS,
    COLORS,
    EVAL_QUESTIONS,
    QUESTIONS,
    SHAPES,
    ShapeImage,
    describe,
    draw,
    generate_split,
    load_shapes,
    sample_shape,
)

CHAT_PROMPTS = {"Hello!", "Hi", "What can you do?", "Thank you!"}


def _split(tmp_path: Path, kind: str, n: int = 60, seed: int = 3) -> tuple[list, dict, Path]:
    folder = tmp_path / kind
    records = json.loads(generate_split(folder, n, seed, kind).read_text())
    return records, load_shapes(folder), folder


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = generate_split(tmp_path / "a", 20, 5, "finetune")
    b = generate_split(tmp_path / "b", 20, 5, "finetune")
    c = generate_split(tmp_path / "c", 20, 6, "finetune")
    assert a.read_text() == b.read_text() != c.read_text()
    for image in sorted((tmp_path / "a" / "images").iterdir()):
        assert image.read_bytes() == (tmp_path / "b" / "images" / image.name).read_bytes()
    # The eval split of the same seed draws other pictures than the training split.
    generate_split(tmp_path / "e", 20, 5, "eval")
    assert ([s.to_dict() for s in load_shapes(tmp_path / "e").values()]
            != [s.to_dict() for s in load_shapes(tmp_path / "a").values()])


def test_parameters_follow_the_spec():
    rng = random.Random(0)
    metas = [sample_shape(rng) for _ in range(3000)]
    for m in metas:
        assert 64 <= m.width <= 192 and 64 <= m.height <= 192
        assert 0.35 <= m.fraction <= 0.75
        assert abs(m.size - m.fraction * min(m.width, m.height)) <= 0.5
        assert m.x >= 0 and m.y >= 0
        assert m.x + m.size <= m.width and m.y + m.size <= m.height
    # Every choice is taken, roughly uniformly; the ranges are reached at both ends.
    for field, values in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS)):
        counts = Counter(getattr(m, field) for m in metas)
        assert set(counts) == set(values)
        assert min(counts.values()) > 0.7 * len(metas) / len(values)
    assert {64, 192} <= {m.width for m in metas} | {m.height for m in metas}
    fractions = [m.fraction for m in metas]
    assert min(fractions) < 0.36 and max(fractions) > 0.74
    assert Counter(m.side for m in metas).keys() == {"left", "right"}


def _far_corner(m: ShapeImage) -> tuple[int, int]:
    """A corner the shape cannot reach: s ≤ 0.75·side keeps the far side free."""
    cx, cy = m.center
    return (m.width - 1 if cx < m.width / 2 else 0, m.height - 1 if cy < m.height / 2 else 0)


def test_pixels_are_exact_and_the_shape_lies_inside_its_box(tmp_path):
    _, shapes, folder = _split(tmp_path, "eval", n=60)
    assert {m.shape for m in shapes.values()} == set(SHAPES)
    for name, m in shapes.items():
        pixels = np.asarray(Image.open(folder / name).convert("RGB"))
        assert pixels.shape == (m.height, m.width, 3)
        cx, cy = m.center
        assert tuple(pixels[int(cy), int(cx)]) == COLORS[m.color]
        assert tuple(pixels[_far_corner(m)[::-1]]) == BACKGROUNDS[m.background]
        # Only two colours (no anti-aliasing), and the shape's pixels stay inside its box.
        flat = pixels.reshape(-1, 3)
        assert {tuple(c) for c in np.unique(flat, axis=0)} == {COLORS[m.color],
                                                               BACKGROUNDS[m.background]}
        rows, cols = np.nonzero((pixels == COLORS[m.color]).all(-1))
        assert rows.min() >= m.y and rows.max() <= m.y + m.size - 1
        assert cols.min() >= m.x and cols.max() <= m.x + m.size - 1
        # Every shape touches its box's bottom edge and spans (almost) its whole width.
        assert rows.max() >= m.y + m.size - 2 and cols.max() - cols.min() >= m.size - 3


def test_triangle_apex_is_at_the_top_middle():
    m = ShapeImage(100, 100, "white", "triangle", "red", 10, 20, 41, 0.41)
    pixels = np.asarray(draw(m))
    rows, cols = np.nonzero((pixels == COLORS["red"]).all(-1))
    top = cols[rows == rows.min()]
    assert rows.min() == 20 and abs(top.mean() - 30) <= 1  # apex at (x + s/2, y)
    assert cols[rows == rows.max()].min() == 10 and cols[rows == rows.max()].max() == 50


def test_answers_come_from_the_vocabulary_and_match_the_ground_truth(tmp_path):
    records, shapes, _ = _split(tmp_path, "eval", n=40)
    for r in records:
        m = shapes[r["image"]]
        assert r["answer"] in ANSWERS[r["question_type"]]
        assert r["answer"] == r["conversations"][1]["value"]
        expected = {"color": m.color, "background": m.background,
                    "side": "left" if m.x + m.size / 2 < m.width / 2 else "right"}
        assert r["answer"] == expected[r["question_type"]]
        assert r["conversations"][0]["value"] == "<image>\n" + QUESTIONS[r["question_type"]]


def test_eval_has_every_question_for_every_image(tmp_path):
    records, shapes, _ = _split(tmp_path, "eval", n=25)
    asked: dict[str, set[str]] = {}
    for r in records:
        asked.setdefault(r["image"], set()).add(r["question_type"])
    assert asked == {name: set(EVAL_QUESTIONS) for name in shapes}
    assert len(records) == 3 * 25


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "lora"])
def test_training_records_parse_and_answer_correctly(tmp_path, kind):
    records, shapes, folder = _split(tmp_path, kind, n=200)
    text_only = [r for r in records if "image" not in r]
    assert len({r["id"] for r in records}) == len(records)
    for position, r in enumerate(records):
        conv = parse_record(r, position, strict=kind == "pretrain")
        assert not conv.notes  # nothing needed fixing
        if "image" not in r:
            assert r["conversations"][0]["value"] in CHAT_PROMPTS
            continue
        assert (folder / r["image"]).is_file()
        assert r["conversations"][0]["value"].startswith("<image>\n")
        m, turns = shapes[r["image"]], r["conversations"]
        for ask, reply in zip(turns[::2], turns[1::2], strict=True):
            question = ask["value"].removeprefix("<image>\n")
            kinds = [k for k, q in QUESTIONS.items() if q == question]
            if kind == "pretrain":
                assert reply["value"] == describe(m)
                assert reply["value"] == f"a {m.color} {m.shape} on a {m.background} background"
            else:
                assert kinds and reply["value"] == {
                    "color": m.color, "side": m.side, "background": m.background}[kinds[0]]
    if kind == "pretrain":
        assert not text_only and all(len(r["conversations"]) == 2 for r in records)
        return
    assert 0.02 <= len(text_only) / len(records) <= 0.08
    assert any(t["value"] == "Hello!" for r in text_only for t in r["conversations"])
    lengths = Counter(len(r["conversations"]) // 2 for r in records if "image" in r)
    questions = Counter(t["value"].removeprefix("<image>\n") for r in records
                        for t in r["conversations"][::2])
    if kind == "finetune":  # one question per record, left/right 4x as often as colour
        assert set(lengths) == {1}
        side, color = questions[QUESTIONS["side"]], questions[QUESTIONS["color"]]
        assert 0.7 <= side / (side + color) <= 0.9
        assert not questions[QUESTIONS["background"]]
    else:  # LoRA: every image record teaches the background question, with rehearsal turns
        assert lengths[1] and lengths[2]  # single- and multi-turn
        assert all(any(t["value"].endswith(QUESTIONS["background"]) for t in r["conversations"])
                   for r in records if "image" in r)
        assert questions[QUESTIONS["color"]] and questions[QUESTIONS["side"]]


def test_questions_override_and_errors(tmp_path):
    records = json.loads(generate_split(tmp_path / "q", 5, 0, "eval", ["color"]).read_text())
    assert [r["question_type"] for r in records] == ["color"] * 5
    with pytest.raises(ValueError, match="unknown question types"):
        generate_split(tmp_path / "x", 1, 0, "eval", ["size"])
    with pytest.raises(ValueError, match="unknown split kind"):
        generate_split(tmp_path / "x", 1, 0, "test")  # type: ignore[arg-type]


def test_two_thousand_images_are_all_written(tmp_path):
    # How fast: bench/bench_shapes.py (no timed assertion here).
    generate_split(tmp_path / "big", 2000, 1, "finetune")
    assert len(list((tmp_path / "big" / "images").iterdir())) == 2000


def test_dpo_pairs_choose_the_right_shape_and_reject_a_wrong_one(tmp_path):
    from llava_cli.data.preference_pairs import preference_records

    records, shapes, folder = _split(tmp_path, "dpo", n=60)
    assert len(records) == 60 and len({r["id"] for r in records}) == 60
    rejected = Counter()
    for position, record in enumerate(records):
        meta = shapes[record["image"]]
        truth = meta.shape
        # large shapes on near-square canvases: the outline spans several tower patches
        assert max(meta.width, meta.height) <= 1.25 * min(meta.width, meta.height) + 1
        assert 0.6 <= meta.fraction <= 0.9
        assert (folder / record["image"]).is_file()
        assert record["conversations"] == [{"from": "human", "value": "<image>\nWhat shape is it?"}]
        assert record["chosen"] == truth and record["rejected"] in SHAPES
        assert record["rejected"] != truth
        rejected[record["rejected"]] += 1
        chosen, other = preference_records(record, position)
        assert chosen["conversations"][-1] == {"from": "gpt", "value": truth}
        assert other["conversations"][:-1] == chosen["conversations"][:-1]
    assert set(rejected) == set(SHAPES)
