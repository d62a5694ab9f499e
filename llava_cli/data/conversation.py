"""LLaVA records → validated conversations (messages, system prompt, image paths).

Every structural problem of a record is found here and reported with the record's id and the
field at fault, so training never starts on data it would silently mis-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llava_cli.data.problems import Problem
from llava_cli.data.text.templates import IMAGE_PLACEHOLDER, Message

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


class RecordError(ValueError):
    """A record that cannot be trained on; `kind` groups errors in the data report."""

    def __init__(self, record_id: str, kind: str, detail: str) -> None:
        super().__init__(f"record {record_id!r}: {detail}")
        self.record_id = record_id
        self.kind = kind
        self.detail = detail


@dataclass
class Conversation:
    """A record ready to render: alternating user/assistant messages starting with the user."""

    record_id: str
    messages: list[Message]
    images: list[str]
    system: str | None = None
    notes: list[str] = field(default_factory=list)  # harmless fixes, reported by inspect-data


def record_id_of(record: Any, position: int) -> str:
    """The record's `id`, or when it has none where it is: `#<position>`, or for a record
    read from a mix its source and position there (`SourceRecord.origin`)."""
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        return str(record["id"])
    return getattr(record, "origin", None) or f"#{position}"


def image_field(record: Any) -> Any:
    """A record's image entry, read the one way every part of this tool reads it: `image`
    when the record has that key, else `images` (Mantis-style multi-image data). The record
    index's byte scan (`json_scan`) applies the same rule (tested on the real records)."""
    if not isinstance(record, dict):
        return None
    return record.get("image", record.get("images"))


def has_image(record: Any) -> bool:
    """Whether a record has an image (see `image_field`); null, "" and [] mean none."""
    return image_field(record) not in (None, "", [])


def image_paths(record: dict[str, Any], rid: str) -> list[str]:
    """The record's image paths ([] for none); RecordError when `image` is not path(s)."""
    if not has_image(record):
        return []
    image = image_field(record)
    paths = image if isinstance(image, list) else [image]
    if not all(isinstance(p, str) and p for p in paths):
        raise RecordError(rid, Problem.BAD_FIELD, "field 'image' must be a path or a list of paths")
    return list(paths)


def _turns_of(record: dict[str, Any], rid: str) -> list[tuple[str, str]]:
    turns = record.get("conversations", record.get("conversation"))
    if not isinstance(turns, list) or not turns:
        raise RecordError(rid, Problem.BAD_FIELD,
                          "field 'conversations' must be a non-empty list of "
                          '{"from": "human"|"gpt"|"system", "value": str}')
    parsed = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(rid, Problem.BAD_FIELD, f"conversations[{n}] is not an object")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = _ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise RecordError(rid, Problem.ROLE_ERROR, f"conversations[{n}].from is {speaker!r}; "
                              "expected 'human', 'gpt' or 'system'")
        if not isinstance(value, str):
            raise RecordError(rid, Problem.BAD_FIELD, f"conversations[{n}].value must be a string")
        parsed.append((role, value))
    return parsed


def parse_record(record: Any, position: int = 0, strict: bool = False) -> Conversation:
    """Validate one LLaVA record and return its conversation.

    Fixes applied (and noted) as LLaVA does: a leading assistant turn is dropped, and an image
    record without `<image>` gets it at the start of the first user turn. Errors: unknown roles,
    turns that do not alternate, a system turn after the start, and a number of `<image>`
    placeholders that differs from the number of images. `strict` (stage 1's one-exchange
    records) applies no turn fixes: anything but one human turn then one gpt turn is an error.
    """
    rid = record_id_of(record, position)
    if not isinstance(record, dict):
        raise RecordError(rid, Problem.BAD_FIELD, "a record must be a JSON object")
    images = image_paths(record, rid)
    turns = _turns_of(record, rid)
    conv = Conversation(rid, [], images)
    if turns[0][0] == "system":
        conv.system = turns.pop(0)[1]
    if strict and [role for role, _ in turns] != ["user", "assistant"]:
        raise RecordError(rid, Problem.ROLE_ERROR,
                          "this template takes exactly one human turn then "
                          f"one gpt turn; the record has {len(turns)} turn(s) "
                          f"({', '.join(role for role, _ in turns)})")
    if turns and turns[0][0] == "assistant":
        turns.pop(0)
        conv.notes.append("dropped a leading assistant turn (as LLaVA does)")
    for n, (role, _) in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(rid, Problem.ROLE_ERROR,
                              f"turn {n + 1} is from {role!r} but turns must "
                              "alternate human, gpt, human, … (a system turn may only come first)")
    if turns and turns[-1][0] == "user":
        turns.pop()
        conv.notes.append("dropped a trailing user turn that has no reply")
    if not turns:
        raise RecordError(rid, Problem.ROLE_ERROR, "no human/gpt exchange in 'conversations'")
    conv.messages = [Message(role, value) for role, value in turns]  # type: ignore[arg-type]
    _check_placeholders(conv)
    return conv


def _check_placeholders(conv: Conversation) -> None:
    found = sum(m.content.count(IMAGE_PLACEHOLDER) for m in conv.messages)
    if conv.images and found == 0:
        first = conv.messages[0]
        conv.messages[0] = Message("user", f"{IMAGE_PLACEHOLDER}\n{first.content}")
        conv.notes.append("added <image> at the start of the first human turn")
    elif found != len(conv.images):
        raise RecordError(conv.record_id, Problem.IMAGE_TOKEN_MISMATCH,
                          f"has {len(conv.images)} image(s) but {found} '<image>' placeholder(s) "
                          "in its text; each image needs exactly one <image>")


def llava_normalize(conv: Conversation) -> Conversation:
    """Rewrite turns as the original LLaVA code does before tokenizing (`llava` mode only).

    For image records, a turn with one `<image>` has it moved to the start, followed by a
    newline, and is stripped of surrounding whitespace. Turns with several images keep their
    placement (the original would collapse them into one).
    """
    if not conv.images:
        return conv
    messages = []
    for m in conv.messages:
        if m.content.count(IMAGE_PLACEHOLDER) == 1:
            rest = m.content.replace(IMAGE_PLACEHOLDER, "").strip()
            m = Message(m.role, f"{IMAGE_PLACEHOLDER}\n{rest}".strip())
        messages.append(m)
    return Conversation(conv.record_id, messages, conv.images, conv.system, conv.notes)
