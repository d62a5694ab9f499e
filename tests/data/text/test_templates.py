"""Templates render exactly the documented prompt strings; supervised spans are the replies."""

from __future__ import annotations

import pytest

from llava_cli.data.text.templates import (
    TEMPLATES,
    Message,
    canonical_template_name,
    render,
    render_with_chat_template,
)
from tests.helpers import load_tokenizer

CONV = [Message("user", "<image>\nQ1?"), Message("assistant", "A1."),
        Message("user", "Q2?"), Message("assistant", "A2.")]
V1_SYS = TEMPLATES["v1"].system

EXPECTED = {
    "plain": "<image>A1.\n",
    "v1": f"{V1_SYS} USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>",
    "llava_llama_2": (
        f"[INST] <<SYS>>\n{TEMPLATES['llava_llama_2'].system}\n<</SYS>>\n\n<image>\nQ1? [/INST] "
        "A1. </s><s>[INST] Q2? [/INST] A2. </s>"),
    "chatml": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<image>\nQ1?<|im_end|>\n<|im_start|>assistant\nA1.<|im_end|>\n<|im_start|>user\n"
               "Q2?<|im_end|>\n<|im_start|>assistant\nA2.<|im_end|>\n"),
    # LLaVA's conversation.py: no system block and no <s> between rounds.
    "mistral_instruct": "[INST] <image>\nQ1? [/INST] A1. </s>[INST] Q2? [/INST] A2. </s>",
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                      "<image>\nQ1?<|im_end|><|im_start|>assistant\nA1.<|im_end|><|im_start|>"
                      "user\nQ2?<|im_end|><|im_start|>assistant\nA2.<|im_end|>"),
    "llava_v1": ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions."
                 " USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"),
    "mpt": (f"<|im_start|>system\n{TEMPLATES['mpt'].system}<|im_end|><|im_start|>user\n<image>\n"
            "Q1?<|im_end|><|im_start|>assistant\nA1.<|im_end|><|im_start|>user\nQ2?<|im_end|>"
            "<|im_start|>assistant\nA2.<|im_end|>"),
}
SUPERVISED = {
    "plain": ["A1.\n"],
    "v1": [" A1.</s>", " A2.</s>"],
    "llava_llama_2": [" A1. </s>", " A2. </s>"],
    "chatml": ["A1.<|im_end|>", "A2.<|im_end|>"],
    "mpt": ["A1.<|im_end|>", "A2.<|im_end|>"],
    "mistral_instruct": [" A1. </s>", " A2. </s>"],
    "chatml_direct": ["A1.<|im_end|>", "A2.<|im_end|>"],
    "llava_v1": [" A1.</s>", " A2.</s>"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendered_text_and_spans(name):
    conv = CONV[:2] if name == "plain" else CONV
    rendered = render(TEMPLATES[name], conv)
    assert rendered.text == EXPECTED[name]
    assert [rendered.text[a:b] for a, b in rendered.spans] == SUPERVISED[name]


def test_llama3_and_vicuna_v0_supervise_only_replies():
    for name, stop in (("llama3", "<|eot_id|>"), ("vicuna_v0", "###")):
        rendered = render(TEMPLATES[name], CONV)
        pieces = [rendered.text[a:b] for a, b in rendered.spans]
        assert [p.strip() for p in pieces] == [f"A1.{stop}", f"A2.{stop}"]


def test_record_system_turn_replaces_default():
    rendered = render(TEMPLATES["v1"], CONV[:2], system="Be brief.")
    assert rendered.text.startswith("Be brief. USER: ")


def test_generation_prompt_ends_with_assistant_header():
    assert render(TEMPLATES["v1"], CONV[:1], add_generation_prompt=True).text.endswith(
        "USER: <image>\nQ1? ASSISTANT:")


def test_empty_reply_supervises_only_end_of_turn():
    rendered = render(TEMPLATES["v1"], [Message("user", "Say nothing."), Message("assistant", "")])
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["</s>"]


def test_aliases_and_unknown_template():
    assert canonical_template_name("vicuna_v1") == "v1"
    assert canonical_template_name("qwen_2") == "chatml"
    # LLaVA's conv_templates names: each trains what LLaVA's train.py trains for it
    for name, ours in (("v0", "v1"), ("v0.5", "v1"), ("v0_plain", "plain"),
                       ("mistral_direct", "chatml_direct"), ("chatml_direct", "chatml_direct"),
                       ("mistral_instruct", "mistral_instruct"), ("llava_v1", "llava_v1"),
                       ("llama_2", "llama_2"), ("mpt", "mpt")):
        assert canonical_template_name(name) == ours, name
    for name in ("default", "llava_v0"):
        with pytest.raises(ValueError, match=f"template '{name}': LLaVA trains it through its "
                           "legacy '### Human:' path"):
            canonical_template_name(name)
    for name in ("v0_mmtag", "v1_mmtag"):
        with pytest.raises(ValueError, match="<Image>…</Image>' text, which is not supported"):
            canonical_template_name(name)
    with pytest.raises(ValueError, match="unknown template 'vicuna9'; choose one of: plain"):
        canonical_template_name("vicuna9")


def test_chat_template_spans_with_real_qwen_tokenizer(assets):
    tokenizer = load_tokenizer(assets / "tokenizers" / "qwen2-1.5b-instruct")
    rendered = render_with_chat_template(tokenizer, CONV)
    pieces = [rendered.text[a:b] for a, b in rendered.spans]
    assert pieces == ["A1.<|im_end|>", "A2.<|im_end|>"]
    assert "<|im_start|>user\n<image>\nQ1?<|im_end|>" in rendered.text


def test_chat_template_missing_is_a_clear_error(assets):
    tokenizer = load_tokenizer(assets / "tokenizers" / "llama2-vicuna-v1.5")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        render_with_chat_template(tokenizer, CONV)
