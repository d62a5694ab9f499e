"""`llava chat CHECKPOINT [--image IMG]`: talk with a trained model in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llava_cli.commands.generate import Adapter, MaxNewTokens, Seed, Temperature, TopK, TopP


def chat(
    checkpoint: Annotated[Path, typer.Argument(
        help="A finetune output, a LoRA run (its base is loaded from the manifest) or any "
        "LLaVA checkpoint.", show_default=False)],
    image: Annotated[Path | None, typer.Option(
        "--image", help="An image for your first message (later ones: /image PATH).")] = None,
    adapter: Adapter = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    top_k: TopK = None,
    seed: Seed = None,
) -> None:
    """Chat with a trained model: several turns through the training template and its stops.
    /image PATH attaches an image to your next message, /reset starts over, /exit (or Ctrl-D)
    ends."""
    from llava_cli.answers.generator import Sampling

    sampling = Sampling(temperature, top_p, top_k, 1, seed)
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.generation.answering_model import load_for_generation
    from llava_cli.generation.chat_session import ChatSession, run_chat

    if image is not None:
        from llava_cli.data.images import check_image

        check_image(image)  # before the model loads
    quiet_libraries()
    session = ChatSession(load_for_generation(checkpoint, adapter), sampling, max_new_tokens)
    if image is not None:
        session.attach(str(image))
    run_chat(session)
