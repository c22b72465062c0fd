"""How the VPT templates are registered: with the released Qwen2-VL labels, or as their stock template.

The released models were trained with LLaMA-Factory 0.9.1's `qwen2_vl` template: an assistant turn is
``{content}<|im_end|>`` (supervised), and the ``\\n`` after it is a separator that opens the *next* user turn (not
supervised); the sequence ends with ``<|im_end|>``. LLaMA-Factory 0.9.5's `qwen2_vl` template formats an assistant
turn as ``{content}<|im_end|>\\n``, so it also supervises that newline and ends every sequence with one. The rendered
text of a conversation is the same in both; only which tokens are labels, and the final newline, differ.
`register_released_template` registers the released form (Qwen2-VL, Qwen2.5-VL: `VPTBase.released_labels`).

A base without released models (Qwen3-VL) keeps its stock template as LLaMA-Factory 0.9.5 registers it:
`register_stock_template` copies the stock template's class (`qwen3_vl`: `ReasoningTemplate`, `qwen3_vl_nothink`:
`Template`) and every value, and only the multimodal plugin changes.
"""

import inspect
from dataclasses import dataclass

from llamafactory.data.data_utils import Role
from llamafactory.data.formatter import FunctionFormatter, StringFormatter
from llamafactory.data.template import TEMPLATES, Template, register_template

from .guard import Private

SEPARATOR = "\n"
"""What 0.9.1 put between an assistant turn and the next user turn, on the user's (prompt) side."""


@dataclass
class ReleasedQwen2VLTemplate(Template):
    r"""`Template` whose user turns after the first start with the released separator (see the module docstring)."""

    def _encode(self, tokenizer, messages, system, tools) -> list[list[int]]:
        encoded = super()._encode(tokenizer, messages, system, tools)
        separator = tokenizer.encode(SEPARATOR, add_special_tokens=False)
        return [
            separator + ids if i > 0 and message["role"] in (Role.USER, Role.OBSERVATION) else ids
            for i, (message, ids) in enumerate(zip(messages, encoded, strict=True))
        ]


PRIVATE = (Private(Template, "_encode", ("self", "tokenizer", "messages", "system", "tools"), patch="released labels"),)


_SKIP = ("name", "mm_plugin", "template_class")


def _stock_values(base_name: str) -> dict:
    r"""The `register_template` arguments the registered ``base_name`` template was built with (but its name, plugin
    and class)."""
    base = TEMPLATES[base_name]
    return {key: getattr(base, key) for key in inspect.signature(register_template).parameters if key not in _SKIP}


def register_stock_template(name: str, base_name: str, mm_plugin) -> None:
    r"""Register ``name`` with `register_template`: the registered ``base_name`` template (its class, formatting
    and labels) with ``mm_plugin``. Idempotent."""
    if name in TEMPLATES:
        return
    template_class = type(TEMPLATES[base_name])
    register_template(name=name, **_stock_values(base_name), mm_plugin=mm_plugin, template_class=template_class)


def register_released_template(name: str, base_name: str, mm_plugin) -> None:
    r"""Register ``name`` with `register_template`: the released form of the registered ``base_name`` template
    (LLaMA-Factory 0.9.5's `qwen2_vl`) with ``mm_plugin``. Idempotent."""
    if name in TEMPLATES:
        return
    values = _stock_values(base_name)
    values.update(
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>"]),
        format_function=FunctionFormatter(slots=["{{content}}<|im_end|>"], tool_format="qwen"),
    )
    register_template(name=name, **values, mm_plugin=mm_plugin, template_class=ReleasedQwen2VLTemplate)
