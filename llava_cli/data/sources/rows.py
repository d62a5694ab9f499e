"""Rows of a table source (Arrow, Parquet) → LLaVA records: LLaVA's own columns (`id`,
`image`, `conversations`) or the chat layout (`messages` with roles user/assistant/system and
content a string holding `<image>` or a list of {type: text|image} parts, plus `images`).
Images are paths (resolved as a JSON record's) or embedded bytes (`{"bytes", "path"}` as
`datasets.Image` stores them, or raw bytes), which travel beside the record.

Preference rows (RLAIF-V's `question`/`chosen`/`rejected`/`image`/`image_path`, TRL's
`prompt`/`chosen`/`rejected` as text or message lists plus `images`) keep their fields as
they are: `data.preference_pairs` reads those layouts, as it does in a JSON file."""

from __future__ import annotations

from typing import Any

from llava_cli.data.sources.record import SourceRecord

ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
IMAGE = "<image>"


def image_column(names: list[str]) -> str | None:
    """The column holding a row's images: `image` if there is one, else `images` (the
    rule JSON records follow, `conversation.image_field`)."""
    return next((n for n in ("image", "images") if n in names), None)


def llava_record(row: dict[str, Any]) -> SourceRecord:
    """The LLaVA record of one row, its embedded image bytes beside it."""
    column = image_column(list(row))
    raw = row.get(column) if column else None
    names, embedded = [], {}
    for n, item in enumerate(raw if isinstance(raw, list) else [] if raw is None else [raw]):
        if isinstance(item, dict) and item.get("bytes") is not None:
            item = item["bytes"]
        elif isinstance(item, dict) and item.get("path"):
            item = item["path"]
        if isinstance(item, (bytes, bytearray, memoryview)):
            name = f"<embedded image {n}>"
            embedded[name] = bytes(item)
            item = name
        names.append(item)  # anything else stays as it is: the record check reports it
    record = {k: v for k, v in row.items() if k not in ("image", "images", "messages")}
    if "messages" in row and "conversations" not in row:
        record["conversations"] = conversations(row["messages"])
    if names:
        record["image"] = names
    return SourceRecord(record, embedded=embedded)


def conversations(messages: Any) -> Any:
    """Chat messages as LLaVA turns; what is not a list of messages is returned unchanged
    so that the record check names the fault."""
    if not isinstance(messages, list):
        return messages
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            turns.append(message)
            continue
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):
            content = "\n".join(_part(part) for part in content)
        turns.append({"from": ROLES.get(role, role), "value": content})
    return turns


def _part(part: Any) -> str:
    """A content part as text: an image part is LLaVA's `<image>` placeholder."""
    if not isinstance(part, dict):
        return str(part)
    if part.get("type") == "image":
        return IMAGE
    return str(part.get("text") or "")
