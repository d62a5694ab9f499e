"""`answers.qa_set` without a model: the QA file read whole, the image folder, the metric names
training logs."""

from __future__ import annotations

import json

import pytest

from llava_cli.answers.qa_set import accuracy_metrics, answer_questions, read_qa_set, tally_answers


def test_a_qa_set_is_read_whole_with_its_folder_and_groups(tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([
        {"id": "a", "question": "Colour?", "answer": "red", "question_type": "yes/no"},
        {"id": "b", "question": "Side?", "answers": ["left", "left", "right"],
         "question_type": "where is it"}]))
    qa = read_qa_set(data)
    assert (len(qa), qa.group_by, qa.image_folder) == (2, "question_type", tmp_path)
    (tmp_path / "pics").mkdir()  # a folder given must be there (its absence is refused)
    assert read_qa_set(data, tmp_path / "pics").image_folder == tmp_path / "pics"
    metrics = accuracy_metrics(tally_answers(qa.records, ["Red.", "right"]))
    # "right" against left, left, right: the official VQA average, (1/3 + 1/3 + 0) / 3 = 2/9.
    assert metrics == pytest.approx({"eval_accuracy": (1 + 2 / 9) / 2,
                                     "eval_accuracy_yes_no": 1.0,
                                     "eval_accuracy_where_is_it": 2 / 9})


def test_a_batch_size_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="batch size 0"):
        list(answer_questions(None, [], tmp_path, batch_size=0))  # type: ignore[arg-type]
