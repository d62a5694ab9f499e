"""`inspect-data` on preference data: which kind a file holds (the guard that refuses records
of the other kind is `data.preference_pairs.KindGuard`), and a pair's view (the prompt once, then
both replies with their supervised spans, as the supervised view shows them) and JSON line."""

from __future__ import annotations

from typing import Any

from llava_cli.data.preference_pairs import PairSample, looks_like_preference
from llava_cli.data.text.encoding import IGNORE_INDEX


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
