"""The model folder's tokenizer and chat template.

Tokenization is the folder's own tokenizer.json through transformers' fast
tokenizer. The chat template is rendered by us, in Jinja's immutable sandbox
with the globals and filters transformers gives templates, so a model folder
can never run code of its own and the prompt equals apply_chat_template's.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson: no HTML escaping, unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _as_transformers_passes(message: dict) -> dict:
    # apply_chat_template drops None values (OpenAI's content=None beside tool_calls would render "None")
    # and fills reasoning_content from its other names; the template must see the same message.
    m = {k: v for k, v in message.items() if v is not None}
    reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
    return m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning}


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    def __init__(self, folder: str | Path):
        # Only transformers' tokenizer is used: its "PyTorch was not found" advice (printed on import when
        # torch is absent, as it is for users) does not apply. Set before the import, unless the user chose.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoTokenizer  # imported late: it is slow to import

        self.folder = Path(folder)
        self.hf = AutoTokenizer.from_pretrained(str(self.folder))
        self.template_source = self._find_template()

    def _find_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        cfg = self.folder / "tokenizer_config.json"
        if cfg.is_file():
            t = json.loads(cfg.read_text()).get("chat_template")
            if isinstance(t, str):
                return t
        return None

    @cached_property
    def template(self):
        if self.template_source is None:
            raise ValueError(f"{self.folder}: the model folder has no chat template")
        return _environment().from_string(self.template_source)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **options) -> str:
        """The prompt text the folder's template makes of a conversation."""
        messages = [_as_transformers_passes(m) for m in messages]
        documents = options.pop("documents", None)
        return self.template.render(messages=messages, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt,
                                    **{**self.hf.special_tokens_map, **options})

    def encode(self, text: str) -> list[int]:
        """Token ids of text that already holds its special tokens (a rendered prompt)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        i = self.hf.convert_tokens_to_ids(token)
        return None if i is None or i == self.hf.unk_token_id else i

    def __len__(self) -> int:
        return len(self.hf)


class StreamDecoder:
    """Turns tokens into text as they come, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
