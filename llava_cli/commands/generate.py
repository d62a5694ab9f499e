"""`llava generate`: answer one prompt (streamed), or every record of a LLaVA file (JSON lines).
The generation options declared here are `llava evaluate`'s too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SINGLE = "Single prompt"
BATCH = "Batch (a LLaVA or QA .json/.jsonl file)"


# The options `generate` and `evaluate` share, declared once.
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate.", min=1)]
Overwrite = Annotated[bool, typer.Option("--overwrite",
                                         help="Replace an existing --output file.")]
Adapter = Annotated[Path | None, typer.Option(
    "--adapter", help="A LoRA run directory to apply to CHECKPOINT.")]
SAMPLING = "Sampling (greedy unless --temperature > 0)"
Temperature = Annotated[float, typer.Option(
    "--temperature", min=0.0, help="0: greedy (the same answer every time); above 0: sample.",
    rich_help_panel=SAMPLING)]
TopP = Annotated[float | None, typer.Option(
    "--top-p", help="Sample from the smallest set of tokens holding this much probability "
    "(default: off).", rich_help_panel=SAMPLING)]
TopK = Annotated[int | None, typer.Option(
    "--top-k", help="Sample from the K likeliest tokens (default: off).",
    rich_help_panel=SAMPLING)]
NumAnswers = Annotated[int, typer.Option(
    "--num-answers", "-n", min=1, help="Answers to sample per prompt (needs --temperature).",
    rich_help_panel=SAMPLING)]
Seed = Annotated[int | None, typer.Option(
    "--seed", help="Seed the sampling: the same answers again (default: a fresh draw).",
    rich_help_panel=SAMPLING)]
AllowOutside = Annotated[bool, typer.Option(
    "--allow-images-outside-folder", help="Accept image paths that leave the image folder "
    "(../x.jpg, /abs/x.jpg); only regular files are ever read.")]


def generate(
    checkpoint: Annotated[Path, typer.Argument(
        help="A finetune output, a LoRA run (its base is loaded from the manifest) or any "
        "LLaVA checkpoint.", show_default=False)],
    image: Annotated[Path | None, typer.Option(
        "--image", help="The image to ask about (leave out for a text-only prompt).",
        rich_help_panel=SINGLE)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="The question.", rich_help_panel=SINGLE)] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Answer every record: a LLaVA record's first human turn, or a QA "
        "record's question (as `llava evaluate` reads them).", rich_help_panel=BATCH)] = None,
    image_folder: Annotated[Path | None, typer.Option(
        "--image-folder", help="Where the records' relative image paths start (default: the "
        "data file's folder).", rich_help_panel=BATCH)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="JSON lines: id, prompt, answer, reference.",
        rich_help_panel=BATCH)] = None,
    max_new_tokens: MaxNewTokens = 64,
    overwrite: Overwrite = False,
    adapter: Adapter = None,
    allow_outside: AllowOutside = False,
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    top_k: TopK = None,
    num_answers: NumAnswers = 1,
    seed: Seed = None,
) -> None:
    """Answer a prompt with a trained model (the training prompt format; greedy unless
    --temperature is above 0)."""
    from llava_cli.answers.generator import Sampling

    sampling = Sampling(temperature, top_p, top_k, num_answers, seed)
    if data is None and prompt is None:
        raise ValueError("pass --prompt TEXT (single mode) or --data FILE --output OUT (batch "
                         "mode)")
    if data is not None and (prompt is not None or image is not None):
        raise ValueError("--data (batch mode) cannot be combined with --prompt/--image")
    if data is not None and output is None:
        raise ValueError("batch mode needs --output OUT.jsonl")
    if data is None and output is not None:
        raise ValueError("--output is for batch mode (--data FILE); a single answer is "
                         "printed (redirect it to keep it)")
    if data is not None and not data.is_file():
        raise ValueError(f"--data {data}: no such file; give a .json or .jsonl file")
    if output is not None:
        from llava_cli.artifacts.output_dir import refuse_existing_file

        refuse_existing_file(output, overwrite)  # the quickest check first
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.generation.answering_model import load_for_generation

    quiet_libraries()
    if data is None:
        image_file = None if image is None else _checked_image(image)
        generator = load_for_generation(checkpoint, adapter)
        answers = generator.answers(image_file, prompt, max_new_tokens, sampling,
                                    stream=True)  # image None: text only
        if len(answers) > 1:
            for number, answer in enumerate(answers, 1):
                typer.echo(f"[{number}] {answer}")
        return
    assert output is not None
    from llava_cli.generation.answering_model import model_folders
    from llava_cli.generation.batch import answer_records, read_prompts
    from llava_cli.generation.output_file import check_output_file

    prompts = read_prompts(data, image_folder, allow_outside)  # every record, before the model
    base, lora = model_folders(checkpoint, adapter)
    check_output_file(output, overwrite, {"checkpoint": base, "adapter": lora,
                                          "checkpoint given": checkpoint},
                      {"data file": data}, (p for r in prompts.records for p in r.images))
    generator = load_for_generation(checkpoint, adapter)
    count = answer_records(generator, prompts, output, max_new_tokens, sampling=sampling)
    typer.echo(f"wrote {count} answers to {output}", err=True)


def _checked_image(image: Path) -> str:
    """--image, checked before the model loads: a regular file that opens as an image (the
    user named it on the command line: no folder to stay in)."""
    from llava_cli.data.images import check_image

    check_image(image)
    return str(image)
