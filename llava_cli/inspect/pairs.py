"""`inspect-data` on preference data: which kind a file holds, the guard that refuses records
of the other kind, and a pair's view (the prompt once, then both replies with their
supervised spans, as the supervised view shows them) and JSON line."""

from __future__ import annotations

from typing import Any

from llava_cli.data.conversation import RecordError, record_id_of
from llava_cli.data.preference import PairBuilder, PairSample, is_preference_record
from llava_cli.data.problems import Problem
from llava_cli.data.samples import SampleBuilder
from llava_cli.data.text.encoding import IGNORE_INDEX

# The fields only preference records have (any layout, `data.preference`): a record with one of
# them is read as a preference record, even when it lacks the rest (then its missing field is
# named), and is never trained on as a supervised record.
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


def file_kind(first: Any, forced: bool | None) -> tuple[bool, str]:
    """(preference?, why) for a file whose first record is `first` (None: no record), unless
    --preference / --no-preference decided."""
    if forced is not None:
        return forced, "--preference" if forced else "--no-preference"
    found = first is not None and looks_like_preference(first)
    return found, f"its first record is {'a preference' if found else 'a supervised'} record"


def prompt_length(pair: PairSample) -> int:
    """The positions that both rows share as their prompt: the common prefix, up to the first
    supervised token of either (the replies may start alike; that is still reply)."""
    first, second = pair.chosen.encoded, pair.rejected.encoded
    limit = min(_first_supervised(first.labels), _first_supervised(second.labels))
    length = 0
    for a, b in zip(first.input_ids[:limit], second.input_ids[:limit], strict=False):
        if a != b:
            break
        length += 1
    # Never split an image run: it belongs to the prompt whole or not at all.
    for start, end in first.image_spans:
        if start < length < end:
            length = start
    return length


def _first_supervised(labels: list[int]) -> int:
    return next((n for n, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def pair_line(pair: PairSample) -> dict[str, Any]:
    """The JSON form of a pair (`--format json|jsonl`): both rows as training sees them."""
    def row(side: str) -> dict[str, Any]:
        encoded = getattr(pair, side).encoded
        return {"input_ids": encoded.input_ids, "labels": encoded.labels,
                "n_supervised": encoded.n_supervised, "truncated": encoded.truncated}

    return {"id": pair.record_id, "prompt_length": prompt_length(pair),
            "chosen": row("chosen"), "rejected": row("rejected")}


def pair_panel(pair: PairSample, tokenizer: Any, position: int, show_ids: bool) -> Any:
    """One preference record as a Rich panel: a summary line, the prompt once, both replies
    with their supervised spans, the notes (and with `show_ids` every position)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    from llava_cli.inspect.view import encoded_id_table, encoded_runs, runs_text

    split = prompt_length(pair)
    chosen = pair.chosen.encoded
    turns = len(pair.conversation.messages) - 1
    summary = (f"prompt {split} tokens · {chosen.n_image_tokens} image · "
               f"{turns} prompt turn{'' if turns == 1 else 's'}")
    if not pair.trainable:
        summary += " · [red]a reply has no supervised token: the pair is dropped from training[/]"
    parts: list[Any] = [Text.from_markup(summary), Text("prompt", style="bold"),
                        runs_text(encoded_runs(chosen, 0, split), tokenizer)]
    if show_ids:
        parts.append(encoded_id_table(chosen, tokenizer, 0, split))
    for side in ("chosen", "rejected"):
        encoded = getattr(pair, side).encoded
        heading = (f"[bold]{side}[/] · {len(encoded)} tokens · "
                   f"{encoded.n_supervised} supervised")
        if encoded.truncated:
            heading += " · [yellow]truncated[/]"
        if encoded.n_supervised == 0:
            heading += " · [red]no supervised token[/]"
        parts += [Text.from_markup(heading), runs_text(encoded_runs(encoded, split), tokenizer)]
        if show_ids:
            parts.append(encoded_id_table(encoded, tokenizer, split))
    parts += [Text(f"note: {note}", style="yellow") for note in pair.conversation.notes]
    return Panel(Group(*parts), title=f"record {pair.record_id!r} (#{position}) · preference pair",
                 title_align="left")
