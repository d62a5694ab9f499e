"""`llava evaluate` end to end on a tiny checkpoint trained and saved here (pretrain → finetune),
with non-square pictures: its answers are stock transformers' greedy answers through the saved
chat template, and its numbers are an independent scorer's on its own predictions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.answers.independent_scorer import ind_score

MAX_NEW = 5
SIZES = [(48, 30), (30, 52), (64, 40), (40, 24)]  # none square
OPTIONS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
INSTRUCTION = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def checkpoint(tiny_finetune) -> Path:
    """The session's finetune output of a tiny random-init model, 2 steps per stage."""
    return tiny_finetune


def stock_answers(model_dir: Path, folder: Path, asks: list[tuple[str | None, str]]) -> list[str]:
    """Greedy answers from stock transformers only: LlavaForConditionalGeneration, AutoProcessor,
    the saved chat template; the picture padded to a square with the mean colour (the run's
    `pad` policy) in plain PIL."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    fill = tuple(int(round(m * 255)) for m in processor.image_processor.image_mean)
    answers = []
    for image, question in asks:
        content = [{"type": "text", "text": question}]
        pictures = None
        if image is not None:
            content = [{"type": "image"}, *content]
            with Image.open(folder / image) as opened:
                picture = opened.convert("RGB")
            side = max(picture.size)
            square = Image.new("RGB", (side, side), fill)
            square.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
            pictures = square
        prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True)
        inputs = processor(images=pictures, text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                                 tokenizer=processor.tokenizer)
        text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(text.split("</s>")[0].strip())
    return answers


def _pictures(folder: Path) -> list[str]:
    colours = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40)]
    names = []
    for i, (size, colour) in enumerate(zip(SIZES, colours, strict=True)):
        picture = Image.new("RGB", size, (255, 255, 255))
        picture.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
        names.append(f"pic{i}.png")
        picture.save(folder / names[-1])
    return names


@pytest.fixture(scope="module")
def qa_set(checkpoint, tmp_path_factory) -> tuple[Path, list[dict], list[str]]:
    """A QA file in every layout (LLaVA conversations, answer, 10 answers, options, a
    text-only question), references built from the stock answers so scores are not all 0."""
    folder = tmp_path_factory.mktemp("qa")
    pictures = _pictures(folder)
    asks, kinds = [], []
    for i in range(8):
        picture = pictures[i % len(pictures)]
        kind = ("llava", "exact", "vqa", "choice")[i % 4]
        question = ["What color is the shape?", "Is the shape on the left or the right?"][i % 2]
        if kind == "choice":
            question = "Which animal is it?\n" + "\n".join(
                f"{k}. {v}" for k, v in OPTIONS.items()) + f"\n{INSTRUCTION}"
        asks.append((picture, question))
        kinds.append(kind)
    asks.append((None, "Say hello."))
    kinds.append("exact")
    answers = stock_answers(checkpoint, folder, asks)
    records = []
    for i, ((picture, question), kind, answer) in enumerate(zip(asks, kinds, answers,
                                                                strict=True)):
        said = answer or "nothing"
        # Right for even records (the stock answer in other case/punctuation), wrong for odd.
        right = i % 2 == 0
        reference = said.upper() + "." if right else "zebra"
        record = {"id": f"r{i}", "question_type": kind}
        if kind == "llava":
            record.update(image=picture, conversations=[
                {"from": "human", "value": f"<image>\n{question}"},
                {"from": "gpt", "value": reference}])
        elif kind == "choice":
            record.update(image=picture, question="Which animal is it?", options=OPTIONS,
                          answer="B")
        else:
            record.update(question=question, answer=reference)
            if picture is not None:
                record["image"] = picture
            if kind == "vqa":
                del record["answer"]
                record["answers"] = [said] * (i % 5) + ["zebra"] * (10 - i % 5)
        records.append(record)
    data = folder / "qa.json"
    data.write_text(json.dumps(records))
    return data, records, answers


def _independent(record: dict) -> dict:
    """The record in the independent scorer's layout."""
    if "conversations" in record:
        return {"answer": record["conversations"][1]["value"]}
    return record


def test_evaluate_equals_stock_transformers_and_an_independent_scorer(checkpoint, qa_set,
                                                                      tmp_path):
    data, records, stock = qa_set
    out = tmp_path / "predictions.jsonl"
    result = CliRunner().invoke(app, ["evaluate", str(checkpoint), "--data", str(data),
                                      "--output", str(out), "--max-new-tokens", str(MAX_NEW),
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [r["id"] for r in records]
    assert [line["prediction"] for line in lines] == stock  # stock transformers' answers
    scores = [ind_score(line["prediction"], _independent(r))
              for line, r in zip(lines, records, strict=True)]
    assert [line["score"] for line in lines] == pytest.approx(scores)
    assert metrics["n"] == len(records)
    assert metrics["accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert metrics["accuracy"] > 0  # the references were built to be right half the time
    assert metrics["group_by"] == "question_type"
    for group, row in metrics["groups"].items():
        mine = [s for s, r in zip(scores, records, strict=True) if r["question_type"] == group]
        assert row == {"accuracy": pytest.approx(sum(mine) / len(mine)), "n": len(mine)}
    assert metrics["metrics"] == {"exact": 5, "vqa": 2, "choice": 2}
    assert all({"id", "prediction", "score", "references", "group", "metric"} <= set(line)
               for line in lines)
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no partial file left


def test_evaluate_prints_a_table_per_named_group(checkpoint, qa_set, tmp_path):
    data, records, _ = qa_set
    out = tmp_path / "p.jsonl"
    out.write_text("keep me\n")
    refused = CliRunner().invoke(app, ["evaluate", str(checkpoint), "--data", str(data),
                                       "--output", str(out)])
    assert refused.exit_code == 2 and "pass --overwrite" in refused.stderr
    assert out.read_text() == "keep me\n"
    result = CliRunner().invoke(app, ["evaluate", str(checkpoint), "--data", str(data),
                                      "--output", str(out), "--overwrite", "--group-by", "id",
                                      "--metric", "exact", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "accuracy by id" in result.stdout and "overall" in result.stdout
    assert all(r["id"] in result.stdout for r in records)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["metric"] for line in lines} == {"exact"} and len(lines) == len(records)
    assert f"wrote {len(records)} predictions" in result.stderr


def _bad(tmp_path: Path, records: list | None, *extra: str) -> tuple[int, str]:
    data = tmp_path / "bad.json"
    if records is not None:
        data.write_text(json.dumps(records))
    # No model is needed: every record is checked before the checkpoint is loaded.
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-model"), "--data",
                                      str(data), "--output", str(tmp_path / "o.jsonl"), *extra])
    return result.exit_code, result.stderr


def test_bad_input_is_one_line_naming_record_field_and_fix(tmp_path):
    good = {"id": "ok", "question": "q", "answer": "a", "question_type": "t"}
    code, err = _bad(tmp_path, None)
    assert code == 2 and "bad.json: no such file" in err
    code, err = _bad(tmp_path, [good, {"id": "q2", "answer": "a"}])
    assert code == 2 and "record 'q2' (number 1 in" in err and "no question; give it" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, err = _bad(tmp_path, [good, {"id": "q3", "question": "q"}])
    assert code == 2 and "record 'q3'" in err and "no reference answer; give it `answer`" in err
    code, err = _bad(tmp_path, [good], "--group-by", "categroy")
    assert code == 2 and "--group-by categroy: no record of" in err and "question_type" in err
    code, err = _bad(tmp_path, [good], "--metric", "choice")
    assert code == 2 and "needs options" in err
