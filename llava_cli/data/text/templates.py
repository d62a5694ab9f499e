"""Conversation templates as data, and the one renderer that turns messages into text + spans.

A template says how each part of a conversation is written; it never says how labels are
computed. Rendering returns the prompt text together with the character spans that are
supervised (assistant replies and their end-of-turn marker). `encoding.py` turns spans into
labels with one mechanism shared by every template, including the tokenizer's own chat
template (`chat-template`), which is rendered by `render_with_chat_template` below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

Role = Literal["system", "user", "assistant"]
IMAGE_PLACEHOLDER = "<image>"
# `mm_use_im_start_end`: the original LLaVA writes each image as <im_start><image><im_end>.
IMAGE_START, IMAGE_END = "<im_start>", "<im_end>"
CHAT_TEMPLATE = "chat-template"


class Message(NamedTuple):
    """One turn of a conversation; `content` may hold `<image>` placeholders.

    A named tuple, not a frozen dataclass: `--check` makes millions of them, and creating one
    costs 0.36 µs instead of 0.64 µs (timeit, this 2-core VM).
    """

    role: Role
    content: str


@dataclass(frozen=True)
class Template:
    """How a conversation is written out. Every field is plain text with `{system}`/`{content}`.

    Supervised: `assistant_format` (the reply and its end-of-turn marker). Everything else
    (system block, user turns, headers, separators) is context and is never supervised.
    """

    name: str
    system: str = ""  # default system prompt; a record's own "system" turn replaces it
    system_format: str = "{system}"  # written only when the system prompt is not empty
    system_in_first_user: bool = False  # Llama-2 style: the system block opens the first turn
    user_format: str = "{content}"
    assistant_header: str = ""  # context written before each reply
    assistant_format: str = "{content}"  # the supervised reply, end-of-turn included
    assistant_footer: str = ""  # context after the end-of-turn marker (e.g. a newline)
    round_separator: str = ""  # context before every user turn except the first
    user_text: bool = True  # False: a user turn is reduced to its image placeholders (stage 1)
    max_rounds: int | None = None
    requires_image: bool = False
    stop: str = ""  # the end-of-turn string a generator stops at
    description: str = ""


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe.  Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses "
    "are socially unbiased and positive in nature.\n\nIf a question does not make any sense, "
    "or is not factually coherent, explain why instead of answering something not correct. "
    "If you don't know the answer to a question, please don't share false information."
)
_LLAMA2_COMMON: dict[str, Any] = {
    "system_format": "<<SYS>>\n{system}\n<</SYS>>\n\n",
    "system_in_first_user": True,
    "user_format": "[INST] {content} [/INST]",
    "assistant_format": " {content} </s>",
    "round_separator": "<s>",
    "stop": "</s>",
}

_VICUNA_V1_COMMON: dict[str, Any] = {
    "system_format": "{system} ", "user_format": "USER: {content} ",
    "assistant_header": "ASSISTANT:", "assistant_format": " {content}</s>", "stop": "</s>",
}
_MPT_COMMON: dict[str, Any] = {
    "system_format": "<|im_start|>system\n{system}<|im_end|>",
    "user_format": "<|im_start|>user\n{content}<|im_end|>",
    "assistant_header": "<|im_start|>assistant\n", "assistant_format": "{content}<|im_end|>",
    "stop": "<|im_end|>",
}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="plain",
            user_format="{content}",
            assistant_format="{content}\n",
            user_text=False,
            max_rounds=1,
            requires_image=True,
            stop="\n",
            description="stage 1 (pretrain): the image, then the caption; caption supervised",
        ),
        Template(
            name="vicuna_v0",
            system=_VICUNA_SYSTEM.replace("user", "human"),
            system_format="{system}###",
            user_format="Human: {content}###",
            assistant_header="Assistant:",
            assistant_format=" {content}###",
            stop="###",
            description="LLaVA's conv_vicuna_v0 as its get_prompt writes it (serving v0 models)",
        ),
        Template(name="v1", system=_VICUNA_SYSTEM, **_VICUNA_V1_COMMON,
                 description="vicuna_v1, the LLaVA-1.5 default"),
        Template(name="llava_v1", system=_VICUNA_SYSTEM.replace("user", "human"),
                 **_VICUNA_V1_COMMON, description="LLaVA's conv_llava_v1 (v1, 'human' system)"),
        Template(name="llama_2", system=_LLAMA2_SYSTEM, description="Llama-2 chat",
                 **_LLAMA2_COMMON),
        Template(name="llava_llama_2", system=_LLAVA_LLAMA2_SYSTEM,
                 description="LLaVA's Llama-2 variant (its own system prompt)", **_LLAMA2_COMMON),
        Template(name="mistral_instruct", **{**_LLAMA2_COMMON, "round_separator": ""},
                 description="LLaVA's mistral_instruct: Llama-2 markers, no system, no <s>"),
        Template(name="mpt", system="A conversation between a user and an LLM-based AI "
                 "assistant. The assistant gives helpful and honest answers.", **_MPT_COMMON,
                 description="MPT (ChatML markers without newlines between turns)"),
        Template(name="chatml_direct", system="Answer the questions.", **_MPT_COMMON,
                 description="LLaVA's chatml_direct: the mpt markers, a short system prompt"),
        Template(
            name="chatml",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_header="<|im_start|>assistant\n",
            assistant_format="{content}<|im_end|>",
            assistant_footer="\n",
            stop="<|im_end|>",
            description="ChatML (Qwen)",
        ),
        Template(
            name="llama3",
            system=_LLAVA_LLAMA2_SYSTEM,
            system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_format="{content}<|eot_id|>",
            stop="<|eot_id|>",
            description="Llama-3 instruct headers (BOS comes from the tokenizer)",
        ),
    )
}
# LLaVA's `--version` names (llava/conversation.py conv_templates) and others' → ours. `v0`:
# LLaVA's train.py (c121f04) sets no conversation for `--version v0` (only a [PAD] pad token,
# which never reaches the labels), so it trains the default, vicuna_v1.
ALIASES = {"vicuna_v1": "v1", "conv_vicuna_v1": "v1", "v0": "v1", "v0.5": "v1",
           "v0_plain": "plain", "mistral_direct": "chatml_direct", "qwen": "chatml",
           "qwen_2": "chatml", "llava_llama_3": "llama3", "chat_template": CHAT_TEMPLATE}
# Names the original trains through paths we do not reproduce: refused, never approximated.
_LEGACY = ("LLaVA trains it through its legacy '### Human:' path (_add_speaker_and_signal, "
           "whose masks drift one token per turn)")
_MMTAG = "it wraps each image in '<Image>…</Image>' text, which is not supported yet"
REFUSED = {"default": _LEGACY, "llava_v0": _LEGACY, "v0_mmtag": _MMTAG, "v1_mmtag": _MMTAG}
TEMPLATE_NAMES = (*TEMPLATES, CHAT_TEMPLATE)


def template_named(name: str | None) -> Template | None:
    """The template `name` (or an alias of it) names; None for the chat template, unknown or
    refused names (no error: for stops and cleaning, where no template means no stop)."""
    return TEMPLATES.get(ALIASES.get(name, name)) if name else None


def canonical_template_name(name: str) -> str:
    """Map LLaVA's conversation names (`vicuna_v1`, `qwen_2`, …) to ours; error on unknown ones."""
    if name in REFUSED:
        raise ValueError(f"template {name!r}: {REFUSED[name]}; use v1 (what LLaVA trains for "
                         "--version v0) or vicuna_v0 (the v0 prompt as LLaVA serves it)")
    name = ALIASES.get(name, name)
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATE_NAMES)}")
    return name


@dataclass(frozen=True)
class Rendered:
    """Prompt text plus the half-open character spans [start, end) that are supervised."""

    text: str
    spans: tuple[tuple[int, int], ...]


class _Builder:
    """Accumulates text pieces and remembers which ones are supervised."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised and text:
            self.spans.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)

    def build(self) -> Rendered:
        return Rendered("".join(self.parts), tuple(self.spans))


def image_text(im_start_end: bool) -> str:
    """What one image placeholder is written as: `<image>`, or within its start/end tokens."""
    return IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END if im_start_end else IMAGE_PLACEHOLDER


def mark_images(messages: Sequence[Message]) -> list[Message]:
    """Every `<image>` within `<im_start>`/`<im_end>`, in every turn as the original's
    `preprocess_multimodal` does. A template that keeps only the images of a user turn
    (`user_text=False`, `plain`) reduces them to bare `<image>` again, as its
    `preprocess_plain` does."""
    marked = image_text(True)
    return [Message(m.role, m.content.replace(IMAGE_PLACEHOLDER, marked)) for m in messages]


def _user_text(template: Template, content: str) -> str:
    if template.user_text:
        return content
    # Stage 1 keeps only the images: the caption is conditioned on the picture alone.
    return IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)


def _reply(template: Template, content: str) -> str:
    fmt = template.assistant_format
    if not content:  # an empty reply teaches only the end-of-turn, not a stray space
        fmt = fmt.replace(" {content}", "{content}").replace("{content} ", "{content}")
    return fmt.format(content=content)


def render(
    template: Template, messages: Sequence[Message], system: str | None = None,
    add_generation_prompt: bool = False,
) -> Rendered:
    """Write `messages` (alternating user/assistant, starting with user) in `template`.

    `system` replaces the template's default system prompt when given. With
    `add_generation_prompt` the text ends with the assistant header, ready for generation.
    """
    system_text = template.system if system is None else system
    system_block = template.system_format.format(system=system_text) if system_text else ""
    out = _Builder()
    if not template.system_in_first_user:
        out.add(system_block)
    for i, message in enumerate(messages):
        if message.role == "user":
            content = _user_text(template, message.content)
            if i == 0 and template.system_in_first_user:
                content = system_block + content
            out.add((template.round_separator if i else "") + template.user_format.format(
                content=content))
        else:
            out.add(template.assistant_header)
            out.add(_reply(template, message.content), supervised=True)
            out.add(template.assistant_footer)
    if add_generation_prompt:
        out.add(template.assistant_header)
    return out.build()


def render_with_chat_template(
    tokenizer: Any, messages: Sequence[Message], system: str | None = None
) -> Rendered:
    """Render with the tokenizer's own Jinja chat template; supervise assistant turns only.

    Each assistant span is found by rendering the conversation up to that turn twice: with the
    generation prompt (where the reply starts) and with the reply (where it ends). This works
    for any template whose renderings of a conversation's prefixes are prefixes of the whole.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template 'chat-template' needs a tokenizer with a chat template; this tokenizer "
            "has none: pick a named template (e.g. --template v1) or use another tokenizer")
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": m.content} for m in messages]

    def text_of(conversation: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation)

    full = text_of(turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start_text, end_text = text_of(turns[:i], True), text_of(turns[: i + 1], False)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations incrementally "
                "(a prefix of the conversation is not a prefix of its rendering), so assistant "
                "turns cannot be located; use a named template instead")
        # Trailing whitespace after the end-of-turn token is formatting, not something to learn.
        end = len(start_text) + len(end_text[len(start_text):].rstrip())
        spans.append((len(start_text), end))
    return Rendered(full, tuple(spans))
