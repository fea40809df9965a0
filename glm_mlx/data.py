"""Training data for `glm-mlx finetune`: JSONL samples as token lists with a loss mask.

Each line is one sample in one of three forms, told apart by its keys:

    {"messages": [...], "tools": [...]}       a chat (OpenAI messages), optional tools
    {"prompt": "...", "completion": "..."}    a chat of one user and one assistant turn
    {"text": "..."}                           plain text, no template

Chats are rendered by the model folder's own template, the code `chat` uses, so
the model trains on exactly what it sees at inference (GLM's template drops the
reasoning of replies before the last user turn; so does training). Loss is taken
only on what the model generates: in each assistant turn, everything after
`<|assistant|>` up to and including the role token that ends the turn. GLM
writes nothing after a reply; the model stops by emitting the next role token
(`<|user|>`, or `<|observation|>` after tool calls), so that token is a target,
and a chat that ends with the assistant gets it appended. Without it the model
learns never to stop.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2.exceptions import TemplateError

from .tokenizer import Tokenizer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
STOP_TOKENS = ("<|user|>", "<|observation|>")  # the role tokens a reply ends with; both are eos ids
_ROLE_RE = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training file that cannot be used: "FILE:LINE: what is wrong"."""


class _Bad(Exception):
    """A malformed sample; load_dataset adds the file and line."""


@dataclass
class Example:
    tokens: list[int]  # the whole rendered sample
    mask: list[bool]   # True where the token is a training target (the loss is on predicting it)


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int  # samples cut to max_seq_len and kept
    skipped: int    # samples dropped: over-long with policy "skip", or no target left after truncation

    def __len__(self) -> int:
        return len(self.examples)


def split_path(path: str | Path) -> tuple[Path, Path | None]:
    """A data argument as (train file, validation file or None).

    A directory means dir/train.jsonl and, where it exists, dir/valid.jsonl (mlx_lm.lora's layout).
    """
    path = Path(path)
    if path.is_dir():
        valid = path / "valid.jsonl"
        return path / "train.jsonl", valid if valid.is_file() else None
    return path, None


def load_dataset(path: str | Path, tokenizer: Tokenizer, *, max_seq_len: int = 2048,
                 overlong: str = "truncate", think: bool | None = None) -> Dataset:
    """Read a JSONL file into examples; raises DataError naming the file and line of a malformed sample.

    overlong: what to do with a sample of more than max_seq_len tokens: "truncate" keeps its first
    max_seq_len tokens, "skip" drops it. think: enable_thinking for the template; None leaves it
    undefined (the template's default).
    """
    if overlong not in ("truncate", "skip"):
        raise ValueError(f'overlong must be "truncate" or "skip", not {overlong!r}')
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (one input and one target), not {max_seq_len}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a .jsonl file (a directory holding train.jsonl "
                        f"and valid.jsonl is split by split_path)")
    missing = [t for t in ROLE_TOKENS if tokenizer.token_id(t) is None]
    if missing:
        raise DataError(f"{tokenizer.folder}: the tokenizer lacks GLM's role tokens {', '.join(missing)}")

    examples, truncated, skipped = [], 0, 0
    cap = line_cap(tokenizer, max_seq_len)
    with path.open("rb") as f:
        for lineno, raw in _lines(f, cap):
            if raw is None:  # more bytes than max_seq_len tokens can hold: over-long whatever it holds
                if overlong == "truncate":
                    raise DataError(f"{path}:{lineno}: longer than {cap / 1e6:.1f} MB, more than {max_seq_len} "
                                    "tokens can hold: it is not read (pass --overlong skip to skip such samples)")
                skipped += 1
                continue
            try:
                tokens, mask = _sample(raw, tokenizer, think)
            except _Bad as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if tokens is None:  # an empty line
                continue
            if len(tokens) > max_seq_len:
                if overlong == "skip":
                    skipped += 1
                    continue
                tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
                if not any(mask[1:]):
                    skipped += 1
                    continue
                truncated += 1
            elif not any(mask[1:]):  # the first token is never predicted
                skipped += 1
                continue
            examples.append(Example(tokens, mask))
    return Dataset(examples, truncated, skipped)


def batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int,
            pad_multiple: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One epoch of (inputs int32 [B, T], targets int32 [B, T], loss mask float32 [B, T]).

    The order is a permutation drawn from (seed, epoch): the same pair gives the same batches,
    another epoch another order. Rows are right-padded to the batch's longest (rounded up to
    pad_multiple, which bounds the shapes a compiled step sees) with token 0 and mask 0. The last
    batch holds the remainder and may be smaller.
    """
    if batch_size < 1 or pad_multiple < 1:
        raise ValueError(f"batch_size and pad_multiple must be positive, not {batch_size} and {pad_multiple}")
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset.examples))
    for start in range(0, len(order), batch_size):
        chunk = [dataset.examples[i] for i in order[start:start + batch_size]]
        width = max(len(e.tokens) for e in chunk) - 1
        width = -(-width // pad_multiple) * pad_multiple
        inputs = np.zeros((len(chunk), width), np.int32)
        targets = np.zeros((len(chunk), width), np.int32)
        mask = np.zeros((len(chunk), width), np.float32)
        for row, e in enumerate(chunk):
            n = len(e.tokens) - 1
            inputs[row, :n] = e.tokens[:-1]
            targets[row, :n] = e.tokens[1:]
            mask[row, :n] = e.mask[1:]
        yield inputs, targets, mask


# One sample -----------------------------------------------------------------------------------------

# A JSON line's bytes against the text it holds: a character escaped as \uXXXX takes 6 bytes for at least 1.
JSON_BYTES_PER_TEXT_BYTE = 6
LINE_SLACK = 1 << 20  # the JSON and a template's own text beside the sample's (keys, tool schemas, role markup)


def line_cap(tok: Tokenizer, max_seq_len: int) -> int:
    """The most bytes a JSONL line may have and still be read: a token is at most the vocabulary's longest
    entry (in bytes: byte-level BPE writes a byte a character), so a line above this holds more than
    max_seq_len tokens of text whatever it says. Reading it whole (a 50 MB line took 8.5 GB to tokenize)
    would only be cut back to max_seq_len tokens."""
    longest = max(map(len, tok.hf.get_vocab()), default=1)
    return JSON_BYTES_PER_TEXT_BYTE * longest * max_seq_len + LINE_SLACK


def _lines(f, cap: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, its bytes) of a binary file, or None for a line of more than `cap` bytes, which is read
    past in pieces, never held."""
    lineno = 0
    while raw := f.readline(cap + 1):
        lineno += 1
        if len(raw.rstrip(b"\r\n")) <= cap:
            yield lineno, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(1 << 20)
        yield lineno, None


def _sample(raw: bytes, tok: Tokenizer, think: bool | None) -> tuple[list[int] | None, list[bool] | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"not UTF-8 (byte {e.start} of the line)") from None
    if not line.strip():
        return None, None
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(f"not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(sample, dict):
        raise _Bad(f"a sample must be a JSON object, not {_kind(sample)}")
    forms = [k for k in ("messages", "prompt", "text") if k in sample or (k == "prompt" and "completion" in sample)]
    if not forms:
        raise _Bad('none of the three forms: expected "messages" (chat), "prompt" and "completion", or "text"')
    if len(forms) > 1:
        raise _Bad(f"mixes forms: has {', '.join(repr(k) for k in forms)}; a sample is one of "
                   '"messages", "prompt"/"completion" or "text"')

    if forms[0] == "text":
        text = sample["text"]
        if not isinstance(text, str) or not text:
            raise _Bad(f'"text" must be a non-empty string, not {_kind(text)}')
        ids = tok.encode(text)
        if tok.hf.eos_token_id is not None and ids[-1] != tok.hf.eos_token_id:
            ids.append(tok.hf.eos_token_id)  # the end of a document is learnt too, as mlx_lm does
        return ids, [True] * len(ids)

    if forms[0] == "prompt":
        for k in ("prompt", "completion"):
            if not isinstance(sample.get(k), str):
                raise _Bad(f'"{k}" must be a string, not {_kind(sample.get(k))}'
                           if k in sample else f'has "{"prompt" if k == "completion" else "completion"}" but no "{k}"')
        _no_role_tokens("prompt", sample["prompt"])
        _no_role_tokens("completion", sample["completion"])
        messages = [{"role": "user", "content": sample["prompt"]},
                    {"role": "assistant", "content": sample["completion"]}]
        return _render(messages, None, tok, think)

    messages = _messages(sample["messages"])
    tools = sample.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise _Bad(f'"tools" must be a list of objects, not {_kind(tools)}')
        _no_role_tokens("tools", tools)
    return _render(messages, tools or None, tok, think)


def _render(messages: list[dict], tools: list[dict] | None, tok: Tokenizer,
            think: bool | None) -> tuple[list[int], list[bool]]:
    """The template's tokens and the mask of what the model generates in each assistant turn."""
    options = {} if think is None else {"enable_thinking": think}
    try:
        text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=False, **options)
    except (TemplateError, TypeError, ValueError, AttributeError) as e:
        raise _Bad(f"the chat template failed on this sample: {e}") from None

    enc = tok.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    assert ids == tok.encode(text), "the offset-mapped tokens differ from encode()"

    # Character spans of the targets: after each <|assistant|> up to the next role token,
    # including it when it is one a reply ends with.
    marks = [(m.start(), m.group()) for m in _ROLE_RE.finditer(text)]
    turns = [i for i, (_, t) in enumerate(marks) if t == "<|assistant|>"]
    expected = sum(m["role"] == "assistant" for m in messages)
    if len(turns) != expected:
        raise _Bad(f"the chat template wrote {len(turns)} assistant turns for {expected} assistant messages")
    inside = np.zeros(len(text) + 1, bool)
    open_end = False
    for i in turns:
        begin = marks[i][0] + len("<|assistant|>")
        if i + 1 < len(marks):
            at, role = marks[i + 1]
            inside[begin:at + len(role) if role in STOP_TOKENS else at] = True
        else:
            inside[begin:len(text)] = True
            open_end = True

    mask = []
    for a, b in offsets:
        first, last = inside[a], inside[max(a, b - 1)]
        assert first == last, f"token at characters {a}:{b} straddles a target boundary"
        mask.append(bool(first))

    if open_end:  # the chat ends with a reply: append the token it stops with
        last = messages[-1]
        assert last["role"] == "assistant", "the rendering ends inside an assistant turn that is not the last message"
        ids.append(tok.token_id("<|observation|>" if last.get("tool_calls") else "<|user|>"))
        mask.append(True)
    return ids, mask


# Validating chat messages ----------------------------------------------------------------------------

def _messages(messages) -> list[dict]:
    """Checked copies of the messages, tool-call arguments decoded to objects (GLM's template needs a dict)."""
    if not isinstance(messages, list) or not messages:
        raise _Bad(f'"messages" must be a non-empty list, not {_kind(messages)}')
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} must be an object, not {_kind(m)}")
        if "role" not in m:
            raise _Bad(f'{where} has no "role"')
        role = m["role"]
        if role not in ROLES:
            raise _Bad(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        m = dict(m)
        m["content"] = _content(f"{where} ({role})", m.get("content"), role)
        for k in ("reasoning_content", "thinking", "reasoning"):
            if m.get(k) is not None and not isinstance(m[k], str):
                raise _Bad(f'{where} ({role}): "{k}" must be a string, not {_kind(m[k])}')
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise _Bad(f'{where} ({role}) has "tool_calls"; only assistant messages call tools')
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise _Bad(f'{where}: "tool_calls" must be a list, not {_kind(calls)}')
            m["tool_calls"] = [_tool_call(f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
        _no_role_tokens(where, m)
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise _Bad("no assistant message: a chat sample needs an assistant turn to learn from")
    return out


def _content(where: str, content, role: str):
    if content is None:
        if role == "assistant":  # a reply of tool calls only
            return None
        raise _Bad(f'{where} has no "content"')
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _Bad(f'{where}: "content" must be a string or a list of parts, not {_kind(content)}')
    text_parts = all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                     for p in content)
    if role == "tool":
        # The template prints each item of a list whole (meant for {"output": ...} results), so
        # OpenAI's text parts are joined to the string they stand for.
        if content and text_parts:
            return "".join(p["text"] for p in content)
        if all(isinstance(p, str) or (isinstance(p, dict) and "output" in p) for p in content):
            return content
        raise _Bad(f'{where}: "content" items must be text parts, strings or {{"output": ...}} results')
    if not all(isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text"
                                      and isinstance(p.get("text"), str)) for p in content):
        raise _Bad(f'{where}: "content" parts must be strings or {{"type": "text", "text": ...}}; '
                   "the model reads text only")
    return content


def _tool_call(where: str, call) -> dict:
    if not isinstance(call, dict):
        raise _Bad(f"{where} must be an object, not {_kind(call)}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise _Bad(f'{where}: "function" must be an object, not {_kind(fn)}')
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Bad(f"{where} has no function name")
    args = fn.get("arguments")
    if args is None:
        args = {}
    elif isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _Bad(f"{where} ({name}): arguments are not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(args, dict):
        raise _Bad(f"{where} ({name}): arguments must be a JSON object, not {_kind(args)}")
    fn = {**fn, "arguments": args}
    return {**call, "function": fn} if "function" in call else fn


def _no_role_tokens(where: str, value) -> None:
    # A role token written inside a message would split the conversation where the template did not.
    for s in _strings(value):
        for t in ROLE_TOKENS:
            if t in s:
                raise _Bad(f"{where} holds the text {t}, a role token of the template; "
                           "it would end the turn there")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
