"""`llava chat`: a conversation with a trained model in the terminal.

Every turn is rendered whole through the training chat template (`answers.generator
.Conversation`), so the model sees what multi-turn training records looked like, and each
reply stops at the template's end of turn. Images attach to the next message (`--image` to the
first, `/image PATH` to any later one), checked as `--image` is before they are used.
Commands: `/image PATH`, `/reset` (a new conversation), `/exit` (or end of input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llava_cli.answers.generator import Conversation, Generator, Sampling
from llava_cli.data.images import check_image

HELP = "commands: /image PATH (attach to your next message), /reset, /exit"


@dataclass
class ChatSession:
    """The state of one chat: the conversation, the images it holds so far (in turn order),
    and the ones waiting for the next message."""

    generator: Generator
    sampling: Sampling
    max_new_tokens: int
    conversation: Conversation = field(default_factory=Conversation)
    images: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)

    def attach(self, path: str) -> str:
        """Queue an image for the next message (a regular file that opens as an image)."""
        check_image(Path(path))
        self.pending.append(path)
        return f"(image {path} attached to your next message)"

    def reset(self) -> str:
        self.conversation.reset()
        self.images.clear()
        self.pending.clear()
        return "(a new conversation)"

    def say(self, text: str, stream: bool = True) -> str:
        """The model's reply to `text` (with the pending images), kept in the conversation."""
        self.conversation.ask(text, len(self.pending))
        self.images += self.pending
        self.pending = []
        reply = self.generator.answers(self.images or None, self.conversation,
                                       self.max_new_tokens, self.sampling, stream=stream)[0]
        self.conversation.reply(reply)
        return reply


def run_chat(session: ChatSession) -> None:
    """The terminal loop: read a line, run a command or answer it (streamed as it comes)."""
    print(f"chatting with the model; {HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            print(session.reset())
        elif line.startswith("/image"):
            path = line.removeprefix("/image").strip()
            try:
                print(session.attach(path) if path else "(give a path: /image PATH)")
            except (ValueError, OSError) as err:
                print(f"(not attached: {err})")
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {HELP})")
        else:
            print("llava> ", end="", flush=True)
            session.say(line)
