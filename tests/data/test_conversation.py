"""Record validation: each kind of bad record gets a specific error naming the record."""

from __future__ import annotations

import pytest

from llava_cli.data.conversation import RecordError, llava_normalize, parse_record


def _rec(turns, **extra):
    return {"id": "r1", "conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def test_image_placeholder_added_when_missing():
    conv = parse_record(_rec([("human", "Describe."), ("gpt", "A cat.")], image="a.jpg"))
    assert conv.messages[0].content == "<image>\nDescribe."
    assert conv.notes == ["added <image> at the start of the first human turn"]


def test_leading_gpt_turn_dropped_and_system_turn_used():
    conv = parse_record(_rec([("system", "Be brief."), ("gpt", "Hi!"), ("human", "Q"),
                              ("gpt", "A")]))
    assert conv.system == "Be brief."
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.notes == ["dropped a leading assistant turn (as LLaVA does)"]


@pytest.mark.parametrize(("record", "kind", "message"), [
    (_rec([("human", "<image>\n<image>\nQ"), ("gpt", "A")], image="a.jpg"),
     "image-token-mismatch", "record 'r1': has 1 image(s) but 2 '<image>' placeholder(s)"),
    (_rec([("human", "<image>\nQ"), ("gpt", "A")]),
     "image-token-mismatch", "record 'r1': has 0 image(s) but 1 '<image>' placeholder(s)"),
    (_rec([("human", "Q"), ("human", "Q again"), ("gpt", "A")]),
     "role-error", "record 'r1': turn 2 is from 'user' but turns must alternate"),
    (_rec([("robot", "Q"), ("gpt", "A")]),
     "role-error", "record 'r1': conversations[0].from is 'robot'; expected 'human', 'gpt'"),
    ({"id": "r1", "conversations": []}, "bad-field", "record 'r1': field 'conversations' must"),
    ({"id": "r1", "conversations": [{"from": "human", "value": 3}]},
     "bad-field", "record 'r1': conversations[0].value must be a string"),
    (_rec([("human", "Q"), ("gpt", "A")], image=[1]),
     "bad-field", "record 'r1': field 'image' must be a path or a list of paths"),
])
def test_bad_records(record, kind, message):
    with pytest.raises(RecordError) as caught:
        parse_record(record)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(message)


def test_strict_parsing_for_stage1_records():
    with pytest.raises(RecordError, match="exactly one human turn then one gpt turn; the record "
                       r"has 4 turn\(s\)"):
        parse_record(_rec([("human", "<image>"), ("gpt", "a"), ("human", "b"), ("gpt", "c")],
                          image="x.jpg"), strict=True)


def test_record_without_id_is_named_by_position():
    with pytest.raises(RecordError, match=r"record '#7'"):
        parse_record({"conversations": "nope"}, 7)


def test_llava_normalize_moves_image_to_front():
    conv = parse_record(_rec([("human", "  What is this?\n<image> "), ("gpt", " A. ")],
                             image="a.jpg"))
    assert llava_normalize(conv).messages[0].content == "<image>\nWhat is this?"
    assert llava_normalize(conv).messages[1].content == " A. "
