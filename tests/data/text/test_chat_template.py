"""The saved Jinja chat template renders exactly the training template."""

from __future__ import annotations

import pytest

from llava_cli.data.text.chat_template import chat_template_for
from llava_cli.data.text.templates import TEMPLATES, Message, mark_images, render

CONV = [Message("user", "<image>\nQ1?"), Message("assistant", "A1."),
        Message("user", "Q2?"), Message("assistant", "")]


@pytest.fixture(scope="module")
def tokenizer():
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    return build_demo_tokenizer()


@pytest.mark.parametrize("im_start_end", [False, True])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_equals_render(tokenizer, name, im_start_end):
    template = TEMPLATES[name]
    tokenizer.chat_template = chat_template_for(template, im_start_end)
    conv = CONV[:2] if name == "plain" else CONV
    # training renders the marked messages (`SampleBuilder.render`)
    trained = mark_images(conv) if im_start_end else conv
    messages = [{"role": m.role, "content": m.content} for m in conv]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render(template,
                                                                             trained).text
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == render(
        template, trained, system="Be brief.").text
    # The processor's list form: an image item becomes "<image>\n", as in the training data.
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1?"}]}]
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        render(template, trained[:1], add_generation_prompt=True).text)
    marked = "<im_start><image><im_end>" in render(template, trained).text
    assert marked == (im_start_end and template.user_text)  # plain keeps the bare <image>
