"""`llava inspect-data`: look at label masks, or check a whole dataset before training on it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from llava_cli.config.run_config import RunConfig
from llava_cli.data.conversation import RecordError, record_id_of
from llava_cli.data.records import RecordFormatError
from llava_cli.data.samples import InputSpec, SampleBuilder
from llava_cli.data.sources.mix import Records, open_records
from llava_cli.model.inputs import input_spec_from_paths, sample_builder

OutputFormat = Literal["rich", "json", "jsonl"]
DEMO_IMAGE_TOKENS = 64


def demo_data() -> tuple[str, str]:
    """The bundled sample dataset: (records file, image folder)."""
    root = resources.files("llava_cli") / "assets" / "sample"
    return str(root / "records.json"), str(root)


@dataclass
class InspectRequest:
    """What to show: a selection of records, or the whole-file check."""

    index: int | None = None
    record_id: str | None = None
    limit: int | None = None
    check: bool = False
    output: OutputFormat = "rich"
    show_ids: bool = False
    workers: int | None = None
    image_tokens: int | None = None
    preference: bool | None = None  # None: the file's first record decides (`pairs.file_kind`)


def _input_spec(config: RunConfig, image_tokens: int | None) -> InputSpec:
    source = config.tokenizer or config.model_name_or_path
    if source is None:
        raise ValueError("no tokenizer: pass --tokenizer PATH or --model PATH")
    return input_spec_from_paths(source, config.model_name_or_path, image_tokens,
                                 config.trust_remote_code,
                                 im_start_end=config.mm_use_im_start_end)


def make_builder(config: RunConfig, image_tokens: int | None = None) -> SampleBuilder:
    """The sample builder that training would use for this configuration."""
    return sample_builder(config, _input_spec(config, image_tokens))


def kind_builder(config: RunConfig, index: Records, request: InspectRequest) -> Any:
    """The builder for this file's kind of records: samples, or preference pairs
    (`data.preference_pairs.PairBuilder`), refusing records of the other kind
    (`data.preference_pairs.KindGuard`)."""
    from llava_cli.data.preference_pairs import KindGuard, PairBuilder
    from llava_cli.inspect.pair_view import file_kind

    preference, why = file_kind(_first_record(index), request.preference)
    builder = make_builder(config, request.image_tokens)
    return KindGuard(PairBuilder(builder) if preference else builder, preference, why)


def _first_record(index: Records, tries: int = 100) -> Any:
    """The file's first record that reads (a broken one is the scan's to report); None when
    none of the first `tries` does."""
    for position in range(min(len(index), tries)):
        try:
            return index.read(position)
        except RecordFormatError:
            continue
    return None


def _selected(index: Records, request: InspectRequest) -> Iterator[tuple[int, Any]]:
    if request.index is not None:
        if not 0 <= request.index < len(index):
            raise ValueError(f"--index {request.index}: record out of range, {index.path} has "
                             f"{len(index)} records (0 to {len(index) - 1})")
        yield request.index, index.read(request.index)
        return
    default_limit = None if request.output == "jsonl" else 3
    limit = request.limit if request.limit is not None else default_limit
    shown = 0
    for position in range(len(index)):
        if limit is not None and shown >= limit:
            return
        record = index.read(position)
        if request.record_id is not None and record_id_of(record, position) != request.record_id:
            continue
        shown += 1
        yield position, record
    if request.record_id is not None and shown == 0:
        raise ValueError(f"no record with id {request.record_id!r} in {index.path}")


def show_records(config: RunConfig, index: Records, request: InspectRequest) -> int:
    """Print the selected records; return the exit status (1 if any failed or is dropped)."""
    from rich.console import Console
    from rich.text import Text

    from llava_cli.inspect.pair_view import pair_line, pair_panel
    from llava_cli.inspect.view import legend, sample_panel

    guard = kind_builder(config, index, request)
    builder = guard.samples
    console = Console(highlight=False)
    if request.output == "rich":
        side_note = _text_side_note(builder)
        if guard.preference:
            side_note += " · preference pairs: only each reply is supervised"
        console.print(legend(), Text(f"  ·  {side_note}", style="dim"))
    status = 0
    for position, record in _selected(index, request):
        try:
            sample = guard.build(record, position, load_images=True, header_only=True)
        except RecordError as err:
            status = 1
            _emit_error(console, request.output, err)
            continue
        status |= int(not sample.trainable)
        if request.output == "rich":
            show = pair_panel if guard.preference else sample_panel
            console.print(show(sample, builder.tokenizer, position, request.show_ids))
        elif guard.preference:
            sys.stdout.write(json.dumps(pair_line(sample)) + "\n")
        else:
            line = {"id": sample.record_id, "input_ids": sample.encoded.input_ids,
                    "labels": sample.encoded.labels}
            sys.stdout.write(json.dumps(line) + "\n")
    return status


def _text_side_note(builder: SampleBuilder) -> str:
    """What the view assumes: template, tokenization, and where the image-token count came
    from (`InputSpec.note`: --image-tokens, the model's config, or the LLaVA-1.5 default)."""
    return (f"template {builder.template_name}, {builder.options.tokenization} tokenization, "
            f"{builder.spec.note}")


def _emit_error(console: Any, output: OutputFormat, err: RecordError) -> None:
    if output == "rich":
        from rich.markup import escape

        # Escaped: the message quotes the data, and a "[b]" in an id is not Rich markup.
        console.print(f"[red]error[/] ({err.kind}): {escape(str(err))}")
    else:
        sys.stdout.write(json.dumps({"id": err.record_id, "error": str(err),
                                     "kind": err.kind}) + "\n")


def check(config: RunConfig, index: Records, request: InspectRequest) -> int:
    """Scan every record; print the report; exit status 1 when any record fails."""
    from rich.console import Console
    from rich.progress import Progress

    from llava_cli.data.scan import check_dataset
    from llava_cli.inspect.view import print_report

    guard = kind_builder(config, index, request)
    console = Console(stderr=request.output != "rich")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("checking records", total=len(index))
        report = check_dataset(lambda: guard, index, request.workers,
                               lambda n: progress.advance(task, n))
    result = {"record_kind": "preference" if guard.preference else "supervised",
              **report.to_dict()}
    if request.output == "rich":
        if guard.preference:
            console.print("preference pairs: a pair is unusable (fully-masked) when either "
                          "reply has no supervised token left", style="dim")
        print_report(console, result)
    else:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


def inspect_data(config: RunConfig, request: InspectRequest) -> int:
    """Run `inspect-data` for a resolved configuration; return the exit status."""
    if config.data_path is None:
        raise ValueError("no data file: pass DATA (a LLaVA .json or .jsonl file, or a mix "
                         "file) or --demo")
    if not Path(config.data_path).exists():
        raise ValueError(f"data file {config.data_path!r} not found")
    try:
        index = open_records(config.data_path)
    except RecordFormatError as err:
        raise ValueError(str(err)) from None
    if request.check:
        return check(config, index, request)
    return show_records(config, index, request)
