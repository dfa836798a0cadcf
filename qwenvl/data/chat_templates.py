"""Jinja chat templates for the VL tokenizer folders this project writes.

The real tokenizer we test with ships Qwen3's text template; vision models need templates that render
image and video content items. These follow the published Qwen2.5-VL and Qwen3-VL conventions:
an image item renders as `<|vision_start|><|image_pad|><|vision_end|>`, a video item with
`<|video_pad|>`; the processor side expands the single pad to the real token count.
"""

_TURNS = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\n' -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- else -%}
{%- for item in message.content -%}
{%- if item.type == 'image' or 'image' in item -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif item.type == 'video' or 'video' in item -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in item -%}
{{- item.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

QWEN2_VL_CHAT_TEMPLATE = (
    r"""{%- if messages[0].role != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
"""
    + _TURNS
)

QWEN3_VL_CHAT_TEMPLATE = _TURNS

CHAT_TEMPLATES = {"qwen2vl": QWEN2_VL_CHAT_TEMPLATE, "qwen2.5vl": QWEN2_VL_CHAT_TEMPLATE, "qwen3vl": QWEN3_VL_CHAT_TEMPLATE}
