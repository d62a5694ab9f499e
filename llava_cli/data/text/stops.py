"""Where a template's turn ends, as token ids or a string, for our generator and for every
saved generation config (so stock `generate` stops where training taught the model to; vLLM
reads the EOS ids, not `stop_strings`).
"""

from __future__ import annotations

from typing import Any

from llava_cli.data.text.templates import TEMPLATES, template_named


def template_stop(tokenizer: Any, template: str | None) -> tuple[str, list[int]]:
    """The template's stop string and, when it is a single token, that token's id
    (`[]` when it takes several tokens, or for a template with no stop of its own)."""
    named = template_named(template)  # aliases too (a saved `vicuna_v1`)
    stop = named.stop if named else ""
    ids = tokenizer.encode(stop, add_special_tokens=False) if stop else []
    return stop, ids if len(ids) == 1 else []


def set_generation_stops(generation_config: Any, tokenizer: Any, template: str | None) -> None:
    """Make `generation_config` end generation at the template's end of turn: a one-token stop
    joins the EOS ids; a longer one becomes `stop_strings` (stock `generate` then needs
    `tokenizer=`; it says so when it is missing). The tokenizer's own EOS is kept."""
    stop, ids = template_stop(tokenizer, template)
    if not stop:
        return
    eos = generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, list | tuple) else [] if eos is None else [eos]
    # An earlier stage's template stop (pretrain's newline) must not end this one's turns;
    # EOS ids the base model came with (Llama-3's several) stay.
    ours = {i for name in TEMPLATES for i in template_stop(tokenizer, name)[1]}
    eos = [i for i in eos if i not in ours or i == tokenizer.eos_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    eos += [i for i in ids if i not in eos]
    generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation_config.stop_strings = None if ids else [stop]
