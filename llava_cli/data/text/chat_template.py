"""Jinja chat templates generated from our template data.

Saved with every output's tokenizer/processor, so `processor.apply_chat_template` at inference
builds exactly the prompt the model was trained on. Message content may be a string with
`<image>` placeholders or the processor's list form (`{"type": "image"}` / `{"type": "text"}`);
each image item becomes `<image>\\n`, as LLaVA's training data writes it (with
`mm_use_im_start_end` every `<image>` is written `<im_start><image><im_end>`, as in training).
"""

from __future__ import annotations

import json
from typing import Any

from llava_cli.data.text.templates import (
    CHAT_TEMPLATE,
    TEMPLATES,
    Template,
    image_text,
)

_CONTENT = """\
{%- macro content_of(message) -%}
{%- if message['content'] is string -%}{{ message['content'] | replace('<image>', IMAGE) }}
{%- else -%}{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{ IMAGE ~ '\\n' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
"""

_BODY = """\
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = content_of(messages[0]) -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = default_system -%}{%- set turns = messages -%}{%- endif -%}
{%- set system_block = system_format | replace('{system}', system) if system else '' -%}
{%- if not system_in_first_user -%}{{ system_block }}{%- endif -%}
{%- for message in turns -%}
{%- set content = content_of(message) -%}
{%- if message['role'] == 'user' -%}
{%- if not user_text -%}{%- set content = '<image>' * (content.count('<image>')) -%}{%- endif -%}
{%- if loop.first and system_in_first_user -%}
{%- set content = system_block + content -%}{%- endif -%}
{{ (round_separator if not loop.first else '') + user_format | replace('{content}', content) }}
{%- else -%}
{%- set reply_format = assistant_format -%}
{%- if not content -%}
{%- set reply_format = reply_format | replace(' {content}', '{content}')
    | replace('{content} ', '{content}') -%}
{%- endif -%}
{{ assistant_header + reply_format | replace('{content}', content) + assistant_footer }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ assistant_header }}{%- endif -%}
"""


def chat_template_for(template: Template, im_start_end: bool = False) -> str:
    """The Jinja chat template that renders conversations exactly as `render(template, …)`
    (of `mark_images(messages)` with `im_start_end`)."""
    values = {
        "default_system": template.system,
        "system_format": template.system_format,
        "system_in_first_user": template.system_in_first_user,
        "user_text": template.user_text,
        "user_format": template.user_format,
        "round_separator": template.round_separator,
        "assistant_header": template.assistant_header,
        "assistant_format": template.assistant_format,
        "assistant_footer": template.assistant_footer,
    }
    # JSON literals are valid Jinja literals (strings with escapes, true/false via aliases).
    settings = "".join(
        f"{{%- set {name} = {json.dumps(value)} -%}}\n" if not isinstance(value, bool)
        else f"{{%- set {name} = {str(value).lower()} -%}}\n"
        for name, value in values.items())
    # a literal: the macro is defined before the settings below
    content = _CONTENT.replace("IMAGE", json.dumps(image_text(im_start_end)))
    return f"{{#- llava_cli template: {template.name} -#}}\n" + content + settings + _BODY


def attach_chat_template(processor: Any, template_name: str, im_start_end: bool = False
                         ) -> None:
    """Make a processor (and its tokenizer) render `template_name` when applying the chat
    template, so a saved output prompts at inference exactly as it was trained."""
    if template_name == CHAT_TEMPLATE:
        return  # the tokenizer's own template is the training template
    template = chat_template_for(TEMPLATES[template_name], im_start_end)
    processor.chat_template = template
    processor.tokenizer.chat_template = template
