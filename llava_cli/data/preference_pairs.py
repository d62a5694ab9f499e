"""Preference records → pairs of samples: one prompt, a chosen and a rejected reply.

A preference record becomes two LLaVA records that share everything but the last reply, and
each goes through the one sample builder (templates, the one masking mechanism, images), with
only that last reply supervised: the log-probabilities DPO compares are the replies' alone.
The images are loaded once per pair; the rejected sample reuses them.

Layouts read, record by record:

- ours / LLaVA-NeXT's DPO data: `image`(s), `conversations` (the prompt: it ends with a human
  turn; earlier gpt turns are context, not trained) or `prompt`, and `chosen` / `rejected`;
- TRL's conversational layout: `prompt`, `chosen` and `rejected` as message lists
  (`{"role", "content"}`, content a string or typed parts `{"type": "text"|"image"}`);
- RLAIF-V: `question`, `chosen`, `rejected`, `image` (or `image_path`);
- LLaVA-RLHF's human preferences: `conversations`, `output_1`, `output_2` (`{"from",
  "value"}`) and `preference` (1 or 2: the chosen output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.data.conversation import RecordError, record_id_of
from llava_cli.data.problems import Problem
from llava_cli.data.samples import Sample, SampleBuilder
from llava_cli.data.sources.record import SourceRecord
from llava_cli.data.text.templates import IMAGE_PLACEHOLDER

LAYOUT_HELP = ('a preference record has a prompt ("conversations" ending with a human turn, '
               '"prompt" or "question") and "chosen" and "rejected" replies, or LLaVA-RLHF\'s '
               '"output_1", "output_2" and "preference"')


def is_preference_record(record: Any) -> bool:
    """Whether `record` is laid out as a preference pair (any layout above)."""
    return isinstance(record, dict) and (
        ("chosen" in record and "rejected" in record) or "preference" in record)


def preference_records(record: Any, position: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (chosen, rejected) LLaVA records of one preference record: the same prompt turns
    and images, each ending with its own gpt reply. RecordError naming the field otherwise.
    A `SourceRecord` (a mix source's) stays one, with its image folder and bytes."""
    rid = record_id_of(record, position)
    if not isinstance(record, dict):
        raise RecordError(rid, Problem.BAD_FIELD, "a record must be a JSON object")
    chosen, rejected = _replies(record, rid)
    prompt = _prompt_turns(record, rid)
    base = {key: value for key, value in record.items()
            if key in ("id", "image", "images", "system")}
    if "image" not in base and "images" not in base and record.get("image_path"):
        base["image"] = record["image_path"]  # RLAIF-V keeps the file's path beside the bytes
    if "id" not in base:
        base["id"] = rid
    pair = tuple({**base, "conversations": [*prompt, {"from": "gpt", "value": reply}]}
                 for reply in (chosen, rejected))
    if isinstance(record, SourceRecord):
        pair = tuple(SourceRecord(one, origin=record.origin, image_folder=record.image_folder,
                                  embedded=record.embedded) for one in pair)
    return pair[0], pair[1]


def _replies(record: dict[str, Any], rid: str) -> tuple[str, str]:
    if "preference" in record:  # LLaVA-RLHF: two outputs and which one people preferred
        choice = record["preference"]
        # bool is an int (True == 1): a flag is not a choice between two outputs.
        if isinstance(choice, bool) or choice not in (1, 2, "1", "2"):
            raise RecordError(rid, Problem.BAD_FIELD,
                              f"field 'preference' is {choice!r}; expected 1 or 2 (the "
                              "preferred of output_1 and output_2)")
        first, second = (_reply_text(record, key, rid) for key in ("output_1", "output_2"))
        return (first, second) if int(choice) == 1 else (second, first)
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise RecordError(rid, Problem.BAD_FIELD,
                          f"no {' or '.join(repr(key) for key in missing)} reply: {LAYOUT_HELP}")
    chosen, rejected = (_reply_text(record, key, rid) for key in ("chosen", "rejected"))
    return chosen, rejected


def _reply_text(record: dict[str, Any], key: str, rid: str) -> str:
    """A reply given as text, as a `{"from"/"role", "value"/"content"}` turn, or as a list of
    such turns (TRL's conversational layout: one assistant message)."""
    if key not in record:
        raise RecordError(rid, Problem.BAD_FIELD, f"no {key!r} reply: {LAYOUT_HELP}")
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = str(value.get("from", value.get("role", "assistant"))).lower()
        if role not in ("gpt", "assistant", "llava"):
            raise RecordError(rid, Problem.ROLE_ERROR,
                              f"field {key!r} is a turn from {role!r}; a reply comes from the "
                              "assistant (gpt)")
        value = _text_content(value.get("value", value.get("content")), rid, key)
    if not isinstance(value, str):
        raise RecordError(rid, Problem.BAD_FIELD,
                          f"field {key!r} must be the reply's text (or one assistant message)")
    if IMAGE_PLACEHOLDER in value:
        # Both replies answer the same prompt and its images: a reply cannot show one.
        raise RecordError(rid, Problem.BAD_FIELD,
                          f"field {key!r} holds {IMAGE_PLACEHOLDER!r} (or an image part); "
                          "images belong to the prompt, a reply is text")
    return value


def _prompt_turns(record: dict[str, Any], rid: str) -> list[dict[str, str]]:
    """The prompt as LLaVA turns, ending with the human turn that the replies answer."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise RecordError(rid, Problem.BAD_FIELD,
                              "field 'conversations' must be a non-empty list of prompt turns")
    elif isinstance(record.get("prompt"), list):
        if not record["prompt"]:
            raise RecordError(rid, Problem.BAD_FIELD,
                              "field 'prompt' must be a non-empty list of messages")
        turns = [_llava_turn(turn, n, rid) for n, turn in enumerate(record["prompt"])]
    else:
        text = record.get("prompt", record.get("question"))
        if not isinstance(text, str):
            raise RecordError(rid, Problem.BAD_FIELD, f"no prompt: {LAYOUT_HELP}")
        turns = [{"from": "human", "value": text}]
    last = turns[-1]
    if not isinstance(last, dict):
        raise RecordError(rid, Problem.BAD_FIELD,
                          f"conversations[{len(turns) - 1}] is not an object")
    speaker = str(last.get("from", last.get("role"))).lower()
    if speaker not in ("human", "user"):
        raise RecordError(rid, Problem.ROLE_ERROR,
                          "the prompt must end with a human turn (the one the chosen and "
                          f"rejected replies answer); its last turn is from {speaker!r}")
    return list(turns)


def _llava_turn(turn: Any, n: int, rid: str) -> dict[str, str]:
    """A TRL message `{"role", "content"}` (content text or typed parts) as a LLaVA turn."""
    if not isinstance(turn, dict) or "role" not in turn:
        raise RecordError(rid, Problem.BAD_FIELD,
                          f"prompt[{n}] must be a message {{\"role\", \"content\"}}")
    role = str(turn["role"]).lower()
    if role not in ("system", "user", "human", "assistant", "gpt"):
        raise RecordError(rid, Problem.ROLE_ERROR, f"prompt[{n}].role is {turn['role']!r}; "
                          "expected 'system', 'user' or 'assistant'")
    content = _text_content(turn.get("content"), rid, f"prompt[{n}].content")
    if not isinstance(content, str):
        raise RecordError(rid, Problem.BAD_FIELD, f"prompt[{n}].content must be text or a "
                          "list of typed parts")
    return {"from": role, "value": content}


def _text_content(content: Any, rid: str, where: str) -> Any:
    """A message's content as text: typed parts joined, an image part as `<image>`."""
    if not isinstance(content, list):
        return content
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind == "image":
            pieces.append(IMAGE_PLACEHOLDER + "\n")
        else:
            raise RecordError(rid, Problem.BAD_FIELD,
                              f"{where}: parts must be {{\"type\": \"text\", \"text\"}} or "
                              "{\"type\": \"image\"}")
    return "".join(pieces)


@dataclass
class PairSample:
    """A preference pair as two samples; the rejected one shares the chosen one's images.

    Reads like a `Sample` where the data checks look (`record_id`, `conversation`,
    `encoded`: the longer row, `image_sizes`, `trainable`)."""

    chosen: Sample
    rejected: Sample

    @property
    def record_id(self) -> str:
        """The record's id."""
        return self.chosen.record_id

    @property
    def conversation(self) -> Any:
        """The chosen conversation (the prompt is the same in both)."""
        return self.chosen.conversation

    @property
    def encoded(self) -> Any:
        """The longer of the two rows (what truncation and length checks judge)."""
        return max(self.chosen.encoded, self.rejected.encoded, key=len)

    @property
    def images(self) -> list[Any]:
        """The pair's images (loaded once)."""
        return self.chosen.images

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """The sizes of the pair's images."""
        return self.chosen.image_sizes

    @property
    def trainable(self) -> bool:
        """Both replies keep at least one supervised token."""
        return self.chosen.trainable and self.rejected.trainable


class PairBuilder:
    """Preference records → `PairSample`s with one sample builder (a run's data options)."""

    def __init__(self, builder: SampleBuilder) -> None:
        self.builder = builder
        self.tokenizer = builder.tokenizer

    def build(self, record: Any, position: int = 0, load_images: bool = True,
              header_only: bool = False) -> PairSample:
        """The pair of `record` (arguments as `SampleBuilder.build`); RecordError when the
        record is not a preference pair or either side is not a valid conversation."""
        chosen_record, rejected_record = preference_records(record, position)
        chosen = self.builder.build(chosen_record, position, load_images, header_only,
                                    last_reply_only=True)
        conv = self.builder.conversation(rejected_record, position)
        rejected = self.builder.sample(conv, chosen.images, chosen.image_sizes,
                                       last_reply_only=True)
        return PairSample(chosen, rejected)


# The fields only preference records have (any layout, `data.preference_pairs`): a record
# with one of them is read as a preference record, even when it lacks the rest (then its
# missing field is named), and is never trained on as a supervised record.
PREFERENCE_FIELDS = ("chosen", "rejected", "preference", "output_1", "output_2")


def looks_like_preference(record: Any) -> bool:
    """Whether `record` is, or was meant to be, a preference record."""
    return is_preference_record(record) or (
        isinstance(record, dict) and any(key in record for key in PREFERENCE_FIELDS))


class KindGuard:
    """A sample builder (or `PairBuilder`) that refuses records of the other kind: a file holds
    supervised records or preference records, and one of the other kind is a `bad-field`
    RecordError naming it, never a silently different sample (a preference record read as a
    supervised one would train on its prompt turns and ignore both replies)."""

    def __init__(self, builder: SampleBuilder | PairBuilder, preference: bool,
                 why: str) -> None:
        self.builder = builder
        self.preference = preference
        self.why = why  # how the file's kind was decided, for the message
        self.tokenizer = builder.tokenizer
        # The sample builder itself (a pair builder's own): its template and options.
        self.samples = builder.builder if isinstance(builder, PairBuilder) else builder

    def build(self, record: Any, position: int = 0, load_images: bool = True,
              header_only: bool = False) -> Any:
        """`builder.build`, after checking that `record` is of the file's kind."""
        if looks_like_preference(record) != self.preference:
            rid = record_id_of(record, position)
            found, expected = ("a supervised", "preference") if self.preference \
                else ("a preference", "supervised")
            raise RecordError(rid, Problem.BAD_FIELD,
                              f"{found} record in a file of {expected} records ({self.why}); "
                              "a file holds one kind of record")
        return self.builder.build(record, position, load_images, header_only)
