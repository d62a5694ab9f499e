"""The records `llava evaluate` reads: what is asked, about which images, and the references.

Two layouts, record by record:

- LLaVA records: `image` (or `images`) and `conversations`; the first human turn is the
  question (its `<image>` placeholder removed), the gpt turn after it the reference;
- QA records: `question`, `answer` (one reference) or `answers` (several: texts, or VQA's
  `{"answer": ...}` objects), `image`, and optionally `id`, `question_type`, `hint` and the
  options of a multiple-choice question (see `scoring.record_options`).

A reference is text (a number is read as its text); anything else (a list inside `answers`,
a mapping without `answer`) could never match an answer and is refused, naming the record and
the field. `llava generate --data` reads the same layouts, the reference then optional.

Fields win over the conversation: a LLaVA record with `answer`/`answers` is scored against
those, a record with `question` is asked that. A multiple-choice question is asked as
LLaVA-1.5 asks MMBench's: the hint (if any) on its own line first, then the question, one line
per option ("A. cat"), then "Answer with the option's letter from the given choices directly."
— the option lines are not added again when the question already holds them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llava_cli.answers.scoring import METRICS, metric_for, record_options, reference_letter
from llava_cli.data.text.templates import IMAGE_PLACEHOLDER

CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
NO_GROUP = "-"  # the group of a record without the --group-by field


@dataclass(frozen=True)
class QARecord:
    """One question to ask and how to score its answer."""

    record_id: str
    question: str  # the prompt text, options included
    images: list[str]
    references: list[str]
    options: dict[str, str] = field(default_factory=dict)
    metric: str = "exact"
    group: str | None = None


def read_qa_record(record: Any, position: int, source: str, metric: str | None = None,
                   group_by: str | None = None, need_reference: bool = True) -> QARecord:
    """The question, images and references of one record (`position`: its index in `source`,
    for the messages); raises ValueError naming the record, the field and what to do.
    `need_reference=False` (`generate --data`): a record without a reference is asked too."""
    from llava_cli.data.conversation import record_id_of

    where = record_place(record_id_of(record, position), position, source)
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, not "
                         f"{type(record).__name__}")
    rid, asked, replied = _from_conversation(record, position)
    question = record.get("question", asked)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no question; give it a `question` field or a first human "
                         "turn in `conversations`")
    references = _references(record, replied, where, need_reference)
    try:
        options = record_options(record)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    chosen = metric_for(references, options, metric)
    if chosen == "choice" and not options and need_reference:
        raise ValueError(f"{where}: --metric choice needs options; give it `options` "
                         "({\"A\": ..., \"B\": ...} or a list) or fields A, B, C, D")
    if chosen == "choice" and references and \
            reference_letter(references[0], options) is None:
        raise ValueError(f"{where}: the reference {references[0]!r} names none of the options "
                         f"{', '.join(options)}; give the right option's letter or text")
    images = _images(record, where)
    prompt = choice_prompt(question.strip(), options, record.get("hint")) if options \
        else question.strip()
    group = None if group_by is None else _group(record, group_by)
    return QARecord(rid, prompt, images, references, options, chosen, group)


def record_place(record_id: str, position: int, source: str) -> str:
    """How messages name a record: its id, and its number in its file."""
    return f"record {record_id!r} (number {position} in {source})"


def choice_prompt(question: str, options: dict[str, str], hint: Any = None) -> str:
    """A multiple-choice question as LLaVA-1.5 asks MMBench's (see the module docstring)."""
    lines = [f"{letter}. {text}" for letter, text in options.items()]
    held = all(line in question.splitlines() for line in lines)
    text = question if held else "\n".join([question, *lines])
    if isinstance(hint, str) and hint.strip() and hint.strip() not in question:
        text = f"{hint.strip()}\n{text}"
    return f"{text}\n{CHOICE_INSTRUCTION}"


def check_group_field(records: Sequence[Any], group_by: str, source: str) -> None:
    """Refuse a --group-by field that no record has (a typo would make one group of all)."""
    if not any(isinstance(r, dict) and group_by in r for r in records):
        first = records[0] if records and isinstance(records[0], dict) else {}
        known = ", ".join(sorted(map(str, first))) or "none"
        raise ValueError(f"--group-by {group_by}: no record of {source} has that field "
                         f"(the first record's fields: {known}); name one of them")


def check_metric(metric: str | None) -> None:
    """Refuse an unknown --metric before anything is loaded."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"--metric {metric}: unknown; one of {', '.join(METRICS)}")


def _from_conversation(record: dict[str, Any], position: int
                       ) -> tuple[str, str | None, str | None]:
    """(id, first human turn, the reply to it) — the conversation is read only when a field
    it stands in for is missing, so a QA record's other keys never fail it."""
    from llava_cli.data.conversation import record_id_of

    fields_given = "question" in record and ("answer" in record or "answers" in record)
    if "conversations" not in record or fields_given:
        return record_id_of(record, position), None, None
    rid, asked, _, replied = record_prompt(record, position)
    return rid, asked, replied


def record_prompt(record: dict[str, Any], position: int) -> tuple[str, str, list[str], str | None]:
    """(id, prompt text, image paths, reference) of a LLaVA record's first exchange."""
    from llava_cli.data.conversation import parse_record

    turns = record.get("conversations") if isinstance(record, dict) else None
    open_question = isinstance(turns, list) and len(turns) == 1  # a prompt with no reply yet
    if open_question:  # parse_record would drop the unanswered turn: give it an empty reply
        record = {**record, "conversations": [*turns, {"from": "gpt", "value": ""}]}
    conv = parse_record(record, position)
    first = conv.messages[0].content.replace(IMAGE_PLACEHOLDER, "").strip()
    reference = None if open_question else next(
        (m.content for m in conv.messages if m.role == "assistant"), None)
    return conv.record_id, first, conv.images, reference


def _references(record: dict[str, Any], replied: str | None, where: str,
                need_reference: bool = True) -> list[str]:
    if "answers" in record:
        given = record["answers"]
        if not isinstance(given, list):
            raise ValueError(f"{where}: `answers` must be a list of reference answers (texts)")
        refs = []
        for n, one in enumerate(given):
            if isinstance(one, dict) and "answer" not in one:
                raise ValueError(f"{where}: `answers[{n}]` is an object without `answer`; "
                                 "give texts, or {\"answer\": text} objects")
            refs.append(_reference(one["answer"], f"answers[{n}].answer", where)
                        if isinstance(one, dict) else _reference(one, f"answers[{n}]", where))
    elif "answer" in record:
        refs = [_reference(record["answer"], "answer", where)]
    else:
        refs = [replied] if replied is not None else []
    refs = [r for r in refs if r is not None and r.strip()]
    if not refs and need_reference:
        raise ValueError(f"{where}: no reference answer; give it `answer`, `answers` or a gpt "
                         "turn after the question in `conversations`")
    return refs


def _reference(value: Any, name: str, where: str) -> str | None:
    """One reference as text (None: left out), or ValueError naming its field."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: `{name}` is a {type(value).__name__}, which can never match "
                     "an answer; a reference must be text (`answers`: a list of texts, or of "
                     "{\"answer\": text} objects)")


def _images(record: dict[str, Any], where: str) -> list[str]:
    from llava_cli.data.conversation import RecordError, image_paths

    try:
        return image_paths(record, where)
    except RecordError:  # said the command's way: the record's place, then the fix
        raise ValueError(f"{where}: `image` must be a path or a list of paths") from None


def _group(record: dict[str, Any], group_by: str) -> str:
    value = record.get(group_by)
    return NO_GROUP if value is None or value == "" else str(value)
