"""`answers.scoring` and `answers.qa`: hand-computed values, and agreement with a second,
straightforward scorer written here on a QA set drawn by a seeded generator."""

from __future__ import annotations

import random

import pytest

from llava_cli.answers.qa import CHOICE_INSTRUCTION, check_group_field, read_qa_record
from llava_cli.answers.scoring import (
    exact_match,
    extract_choice,
    metric_for,
    normalize_answer,
    record_options,
    score_answer,
    tally,
    vqa_accuracy,
)
from tests.answers.independent_scorer import ind_score, ind_vqa

# ---- a seeded QA set with predictions in the phrasings models use ---------------------------

WORDS = ["cat", "dog", "red car", "two", "3", "yes", "no", "black-and-white", "the table",
         "a man", "3.5", "left", "One", "blue sky", "traffic light", "1,000"]


def perturb(rng: random.Random, answer: str) -> str:
    """The same answer written another way (or, sometimes, a different answer)."""
    choice = rng.randrange(7)
    if choice == 0:
        return answer.upper()
    if choice == 1:
        return f"{answer}."
    if choice == 2:
        return f"The {answer}!"
    if choice == 3:
        return f"  {answer}\n"
    if choice == 4:
        return answer.replace("two", "2").replace("3", "three")
    return rng.choice(WORDS)


def draw_qa_set(seed: int, n: int) -> list[tuple[dict, str]]:
    """(record, prediction) pairs: exact, VQA with 10 references, multiple choice."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            answer = rng.choice(WORDS)
            record = {"id": f"q{i}", "question": "What?", "answer": answer,
                      "question_type": "exact"}
            pairs.append((record, perturb(rng, answer)))
        elif kind == 1:
            pool = rng.sample(WORDS, 3)
            answers = [rng.choice(pool) for _ in range(10)]
            record = {"id": f"q{i}", "question": "What?", "answers": answers,
                      "question_type": "vqa"}
            pairs.append((record, perturb(rng, rng.choice(pool))))
        else:
            texts = rng.sample(["cat", "dog", "bird", "fish", "horse", "red car"], 4)
            options = dict(zip("ABCD", texts, strict=True))
            letter = rng.choice("ABCD")
            said = rng.choice("ABCD") if rng.random() < 0.3 else letter
            phrasing = rng.choice(["{L}", "({L})", "{L}.", "The answer is {L}", "{l}) {T}",
                                   "{T}", "the {T}."])
            prediction = phrasing.format(L=said, l=said.lower(), T=options[said])
            record = {"id": f"q{i}", "question": "Which?", "options": options,
                      "answer": letter, "question_type": "choice"}
            pairs.append((record, prediction))
    return pairs


def test_the_scorer_equals_an_independent_one_on_a_drawn_qa_set():
    pairs = draw_qa_set(seed=17, n=300)
    ours, theirs = [], []
    for position, (record, prediction) in enumerate(pairs):
        qa = read_qa_record(record, position, "drawn.json", group_by="question_type")
        score = score_answer(prediction, qa.references, qa.metric, qa.options)
        assert score == pytest.approx(ind_score(prediction, record)), (record, prediction)
        ours.append((score, qa.group))
        theirs.append(ind_score(prediction, record))
    total = tally(ours)
    assert total.accuracy() == pytest.approx(sum(theirs) / len(theirs))
    assert 0.2 < total.accuracy() < 0.9  # both right and wrong answers were drawn
    for group in ("exact", "vqa", "choice"):
        mine = [s for (r, _), s in zip(pairs, theirs, strict=True)
                if r["question_type"] == group]
        assert total.group_accuracy()[group] == {"accuracy": pytest.approx(sum(mine) / len(mine)),
                                                 "n": len(mine)}


# ---- hand-computed values -------------------------------------------------------------------

@pytest.mark.parametrize(("text", "normal"), [
    ("The Cat.", "cat"), ("black-and-white", "black and white"), ("two dogs!", "2 dogs"),
    ("3.5", "3.5"), ("1,000 people", "1000 people"), ("Yes, it is", "yes it is"),
    ("a  man (left)", "man left"), ("None", "0"), ("don't\tknow\n", "don't know")])
def test_normalisation(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match():
    assert exact_match("The cat.", ["cat"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    assert exact_match("Two", ["dog", "2"]) == 1.0  # any reference


def test_vqa_soft_accuracy_both_forms_by_hand():
    refs = lambda k: ["cat"] * k + ["dog"] * (10 - k)  # noqa: E731
    # Official: leave each of the 10 out; with k matches, k of the 10 see k-1, the others k.
    assert vqa_accuracy("cat", refs(0)) == 0.0
    assert vqa_accuracy("cat", refs(1)) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("cat", refs(2)) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy("cat", refs(3)) == pytest.approx((3 * 2 / 3 + 7) / 10)  # 0.9
    assert vqa_accuracy("cat", refs(4)) == 1.0
    assert vqa_accuracy("The Cat", refs(3)) == pytest.approx(0.9)
    # Simple: min(matches / 3, 1).
    assert vqa_accuracy("cat", refs(1), official=False) == pytest.approx(1 / 3)
    assert vqa_accuracy("cat", refs(2), official=False) == pytest.approx(2 / 3)
    assert vqa_accuracy("cat", refs(3), official=False) == 1.0
    for k in range(11):
        assert vqa_accuracy("cat", refs(k)) == pytest.approx(ind_vqa("cat", refs(k)))


OPTIONS = {"A": "cat", "B": "dog", "C": "a red bird", "D": "fish"}


@pytest.mark.parametrize(("answer", "letter"), [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("The answer is B", "B"),
    ("The answer is (c).", "C"), ("answer: d", "D"), ("Option C", "C"), ("b) cat", "B"),
    ("C: a red bird", "C"), ("I think D", "D"), ("dog", "B"), ("It is a dog.", "B"),
    ("Red bird", "C"), ("A cat sits on the mat", "A"), ("A", "A"), ("nothing here", None),
    ("B or D", None), ("E", None), ("", None)])
def test_choice_letter_extraction(answer, letter):
    assert extract_choice(answer, OPTIONS) == letter


def test_option_layouts():
    assert record_options({"options": {"a": "x", "B": " y "}}) == {"A": "x", "B": "y"}
    assert record_options({"options": ["x", "y", "z"]}) == {"A": "x", "B": "y", "C": "z"}
    assert record_options({"choices": ["x", "y"]}) == {"A": "x", "B": "y"}
    mmbench = {"A": "x", "B": "y", "C": float("nan"), "D": None, "question": "q"}
    assert record_options(mmbench) == {"A": "x", "B": "y"}
    assert record_options({"question": "q", "answer": "x"}) == {}


def test_metric_per_record_and_override():
    assert metric_for(["x"], {}) == "exact"
    assert metric_for(["x", "y"], {}) == "vqa"
    assert metric_for(["B"], {"A": "x", "B": "y"}) == "choice"
    assert metric_for(["x", "y"], {}, "exact") == "exact"
    assert score_answer("y", ["x", "y"], "exact") == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        metric_for(["x"], {}, "bleu")


# ---- records --------------------------------------------------------------------------------

def test_llava_record_is_asked_its_first_turn_and_scored_on_the_reply():
    record = {"id": "r1", "image": "a.png", "question_type": "color", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red"},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}
    qa = read_qa_record(record, 0, "d.json", group_by="question_type")
    assert (qa.record_id, qa.question, qa.images, qa.references, qa.metric, qa.group) == (
        "r1", "What color?", ["a.png"], ["Red"], "exact", "color")
    # The `answer` field wins over the conversation (the demo's records carry both).
    assert read_qa_record({**record, "answer": "red"}, 0, "d.json").references == ["red"]


def test_qa_record_layouts():
    vqa = {"question": "How many?", "answers": [{"answer": "2"}, {"answer": "two"}, "3"],
           "image": ["x.png"]}
    qa = read_qa_record(vqa, 4, "d.json", group_by="kind")
    assert (qa.record_id, qa.references, qa.metric, qa.group) == ("#4", ["2", "two", "3"],
                                                                 "vqa", "-")
    choice = {"id": 7, "question": "Which animal?", "hint": "A farm.", "A": "cow", "B": "cat",
              "answer": "B"}
    qa = read_qa_record(choice, 0, "d.json")
    assert qa.metric == "choice" and qa.images == []
    assert qa.question == f"A farm.\nWhich animal?\nA. cow\nB. cat\n{CHOICE_INSTRUCTION}"
    listed = {**choice, "question": "Which animal?\nA. cow\nB. cat"}  # options already there
    assert read_qa_record(listed, 0, "d.json").question.count("A. cow") == 1
    by_text = {"question": "Which?", "options": ["cow", "cat"], "answer": "cat"}
    qa = read_qa_record(by_text, 0, "d.json")
    assert score_answer("(B)", qa.references, qa.metric, qa.options) == 1.0


@pytest.mark.parametrize(("record", "message"), [
    ({"id": "x", "answer": "a"}, r"record 'x' \(number 0 in d.json\): no question"),
    ({"id": "x", "question": "q"}, r"record 'x' .*no reference answer; give it `answer`"),
    ({"id": "x", "question": "q", "answers": "a"}, "`answers` must be a list"),
    ({"id": "x", "question": "q", "answer": "a", "image": 3}, "`image` must be a path"),
    ({"id": "x", "question": "q", "options": ["cat", "dog"], "answer": "E"},
     r"the reference 'E' names none of the options A, B; give"),
    (["not", "a", "record"], "must be a JSON object"),
])
def test_bad_records_name_the_record_and_the_field(record, message):
    with pytest.raises(ValueError, match=message):
        read_qa_record(record, 0, "d.json")


def test_choice_metric_needs_options_and_group_field_must_exist():
    with pytest.raises(ValueError, match="--metric choice needs options"):
        read_qa_record({"id": "x", "question": "q", "answer": "a"}, 0, "d.json", "choice")
    with pytest.raises(ValueError, match="--group-by categroy: no record of d.json has"):
        check_group_field([{"question": "q", "category": "c"}], "categroy", "d.json")
