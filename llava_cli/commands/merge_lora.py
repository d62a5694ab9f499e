"""`llava merge-lora RUN_DIR --output-dir OUT`: options → `llava_cli.merge.merge_lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def merge_lora(
    run_dir: Annotated[Path, typer.Argument(
        help="A LoRA/QLoRA run directory, or a checkpoint-N inside one.", show_default=False)],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", help="Where to write the merged model.", show_default=False)],
    base: Annotated[str | None, typer.Option(
        help="Base LLaVA checkpoint to merge into (default: the one in the run's manifest; "
        "either way it must have the weights the run was trained on).",
        show_default=False)] = None,
    dtype: Annotated[str, typer.Option(
        help="float32 | bfloat16 | float16: the base is loaded (unquantized) and saved in it.")
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write into a non-empty output directory (old weight files there "
        "are replaced; other files are kept).")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Reload the result with stock transformers and compare "
        "its logits with base + adapter (default: on).")] = True,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard.")] = "5GB",
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="Allow code shipped with the base or run to execute "
        "(only ever from this flag; never from the run's saved configuration).")] = False,
) -> None:
    """Merge a LoRA/QLoRA run into its full-precision base and save a standalone checkpoint.

    An original LLaVA LoRA run (adapter + non_lora_trainables.bin) is converted and merged
    into --base (the LLM it was trained on), verified against the original's own layout.

    The result loads with stock transformers (LlavaForConditionalGeneration, pipeline) and vLLM.
    Verified: logits vs the unmerged base + adapter (QLoRA: also vs the quantized base,
    where bitsandbytes runs). A failed check exits 1 and writes nothing. A base whose weight
    files changed since the run was trained (its fingerprint in the manifest) is refused.
    """
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.merge.merge import describe
    from llava_cli.merge.merge import merge_lora as run

    quiet_libraries()
    if _original_lora(run_dir):  # the original LLaVA's layout: converted, merged, verified
        from llava_cli.convert.from_original import convert_original
        from llava_cli.convert.from_original import describe as converted

        ignored = [name for name, given in (("--dtype", dtype != "float32"),
                                            ("--max-shard-size", max_shard_size != "5GB"),
                                            ("--trust-remote-code", trust_remote_code)) if given]
        if ignored:  # convert writes float32 in one shard and never runs remote code
            raise ValueError(f"{', '.join(ignored)}: not available for an original LLaVA LoRA "
                             "run (converted and merged in float32); drop them")

        typer.echo(converted(convert_original(run_dir, output_dir, base=base,
                                              overwrite=overwrite, verify=verify,
                                              log=typer.echo)))
        return
    # Bad input exits 2, a failed verification 1 (nothing written): the command boundary.
    result = run(run_dir, output_dir, base=base, dtype=dtype, overwrite=overwrite,
                 verify=verify, max_shard_size=max_shard_size, log=typer.echo,
                 trust_remote_code=trust_remote_code)
    if result.bits != 16 and len(result.checks) > 1:  # the quantized check ran
        typer.echo(f"QLoRA: merged into the unquantized base; the {result.bits}-bit check has a "
                   "looser tolerance (it measures quantization error, not the merge)")
    typer.echo(describe(result))


def _original_lora(run_dir: Path) -> bool:
    """A LoRA run written by the original LLaVA (adapter + non_lora_trainables.bin)."""
    from llava_cli.artifacts.original_layout import find_original

    found = find_original(run_dir)
    return found is not None and found.kind == "lora"
