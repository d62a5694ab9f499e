"""How `inspect-data` shows samples: a Rich view of the label mask, JSON Lines, and the report."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from llava_cli.data.samples import Sample
from llava_cli.data.text.encoding import IGNORE_INDEX

SUPERVISED_STYLE = "bold green"
MASKED_STYLE = "dim"
IMAGE_STYLE = "bold white on magenta"
TURN_STYLE = "cyan"


def _runs(sample: Sample) -> list[tuple[str, list[int]]]:
    """Consecutive tokens grouped by kind: 'image', 'supervised' or 'masked'."""
    return encoded_runs(sample.encoded)


def encoded_runs(encoded: Any, start: int = 0, stop: int | None = None
                 ) -> list[tuple[str, list[int]]]:
    """The runs of positions [start, stop) of an encoded row (a preference pair's prompt or
    one reply); an image run is never split."""
    ids, labels = encoded.input_ids, encoded.labels
    image_starts = dict(encoded.image_spans)
    runs: list[tuple[str, list[int]]] = []
    position, stop = start, len(ids) if stop is None else stop
    while position < stop:
        if position in image_starts:
            end = image_starts[position]
            runs.append(("image", ids[position:end]))
            position = end
            continue
        kind = "supervised" if labels[position] != IGNORE_INDEX else "masked"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(ids[position])
        else:
            runs.append((kind, [ids[position]]))
        position += 1
    return runs


def sample_text(sample: Sample, tokenizer: Any) -> Text:
    """The sample as text: supervised tokens highlighted, masked dimmed, images as chips."""
    return runs_text(_runs(sample), tokenizer)


def runs_text(runs: list[tuple[str, list[int]]], tokenizer: Any) -> Text:
    """Runs (`encoded_runs`) as text: supervised highlighted, masked dimmed, images as chips."""
    text = Text()
    previous = None
    for kind, ids in runs:
        if previous == "supervised" and kind != "supervised":
            text.append(" ⏎\n", style=TURN_STYLE)  # a reply ended: the next turn starts below
        if kind == "image":
            text.append(f"<image ×{len(ids)}>", style=IMAGE_STYLE)
        else:
            style = SUPERVISED_STYLE if kind == "supervised" else MASKED_STYLE
            text.append(tokenizer.decode(ids), style=style)
        previous = kind
    return text


def id_table(sample: Sample, tokenizer: Any) -> Table:
    """Every position with its id, token and label (`--show-ids`); image runs in one row."""
    return encoded_id_table(sample.encoded, tokenizer)


def encoded_id_table(encoded: Any, tokenizer: Any, start: int = 0, stop: int | None = None
                     ) -> Table:
    """`id_table` of positions [start, stop) of an encoded row."""
    table = Table("pos", "id", "token", "label", box=None, pad_edge=False)
    position = start
    for kind, ids in encoded_runs(encoded, start, stop):
        if kind == "image":
            table.add_row(f"{position}-{position + len(ids) - 1}", str(ids[0]),
                          Text(f"<image ×{len(ids)}>", style=IMAGE_STYLE), "-100")
            position += len(ids)
            continue
        for token in ids:
            label = encoded.labels[position]
            style = SUPERVISED_STYLE if label != IGNORE_INDEX else MASKED_STYLE
            table.add_row(str(position), str(token),
                          Text(repr(tokenizer.convert_ids_to_tokens(token)), style=style),
                          str(label))
            position += 1
    return table


def sample_panel(sample: Sample, tokenizer: Any, position: int, show_ids: bool) -> Panel:
    """One record as a Rich panel with a summary line and its notes."""
    enc = sample.encoded
    summary = (f"{len(enc.input_ids)} tokens · {enc.n_image_tokens} image · "
               f"{enc.n_supervised} supervised · {len(sample.conversation.messages)} turns")
    if enc.truncated:
        summary += " · [yellow]truncated[/]"
    if not sample.trainable:
        summary += " · [red]no supervised token: dropped from training[/]"
    parts: list[Any] = [Text.from_markup(summary), sample_text(sample, tokenizer)]
    parts += [Text(f"note: {note}", style="yellow") for note in sample.conversation.notes]
    if show_ids:
        parts.append(id_table(sample, tokenizer))
    return Panel(Group(*parts), title=f"record {sample.record_id!r} (#{position})",
                 title_align="left")


def legend() -> Text:
    """Explains the colours once."""
    return Text.assemble(("supervised", SUPERVISED_STYLE), "  ", ("masked", MASKED_STYLE),
                         "  ", ("<image ×N>", IMAGE_STYLE), " image tokens (masked)")


def report_table(report: dict[str, Any]) -> Table:
    """The `--check` report for humans (errors red, notes and warnings yellow)."""
    table = Table("", "count", "examples", title="dataset check", title_justify="left")
    lengths = report["length_tokens"]
    table.add_row("records", str(report["records"]), "")
    table.add_row("image / text-only / multi-image",
                  f"{report['image_records']} / {report['text_only_records']} / "
                  f"{report['multi_image_records']}", "")
    if lengths:
        table.add_row("length p50 / p90 / p99 / max (tokens, images included)",
                      " / ".join(str(lengths[k]) for k in ("p50", "p90", "p99", "max")), "")
    groups = [({"truncated": report["truncated"]}, ""), (report["problems"], "red"),
              ({**report["notes"], **report["warnings"]}, "yellow")]
    for counts, style in groups:
        for kind, count in sorted(counts.items()):
            # Text, not a str: ids are data, and a "[b]" in one is not Rich markup.
            table.add_row(Text(kind, style=style), str(count),
                          Text(", ".join(report["examples"].get(kind, []))))
    return table


def print_report(console: Console, report: dict[str, Any]) -> None:
    """The table, the first message of each problem, and the verdict."""
    console.print(report_table(report))
    # Messages quote the data (ids, paths): escaped, so a "[b]" in them is not Rich markup.
    for kind, message in report["first_messages"].items():
        console.print(f"[red]{kind}[/]: {escape(message)}", highlight=False)
    for kind, message in report["warning_messages"].items():
        console.print(f"[yellow]{kind}[/] (warning): {escape(message)}", highlight=False)
    if report["ok"]:
        warned = " (see the warnings above)" if report["warnings"] else ""
        console.print(f"[green]OK[/]: every record can be trained on{warned}")
    elif report["records"] == 0:
        console.print("[red]FAILED[/]: the file holds no records")
    else:
        console.print("[red]FAILED[/]: fix the records above, or pass --skip-bad-records to "
                      "training to skip them (fully masked records are always dropped)")
