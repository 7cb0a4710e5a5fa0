"""Tool calls: how a model family writes them, how they reach the model, and
how its text turns back into OpenAI's ``tool_calls``.

A format (``ToolFormat``) is the text around one call: where it starts (the
trigger), the head up to the arguments, the arguments as a JSON object, and
the tail. It gives three things:

- the structural tag xgrammar compiles into the job's grammar
  (``structural_tag``): ``required`` and a named function force calls from
  the first token; ``auto`` leaves text free until the trigger, then the
  whole call is constrained (xgrammar's triggered tags);
- the prompt: a chat template that knows tools gets ``tools=`` and the
  history as it is; one that does not (the demo model's) gets the
  ``generic`` rendering: a system message that lists the tools and shows the
  call format (``render_generic``);
- the parser (``ToolCallParser``) that splits the streamed text into content
  and call pieces: the first piece of a call names it, later ones extend its
  arguments as they are generated.

Formats: ``hermes`` (Hermes, Qwen 2.5/3: ``<tool_call>{...}</tool_call>``),
``llama3_json`` (Llama 3.x: ``{"name": ..., "parameters": ...}``), ``mistral``
(``[TOOL_CALLS][{...}]``) and ``generic`` (the hermes text, rendered by llmq).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from broker.schemas import Job, Message, Tool, ToolCallDelta

# How far past a trigger the head of a call may run before the text is taken
# for plain text after all (a name is at most 64 characters).
MAX_HEAD_CHARS = 200


@dataclass(frozen=True)
class ToolFormat:
    name: str
    trigger: str  # the text that opens a call
    prefix: str  # the call's text up to the function name
    middle: str  # between the name and the arguments object
    suffix: str  # after the arguments object
    head: re.Pattern[str]  # a parsed head: the trigger, then up to the arguments; group "name"
    tail: re.Pattern[str]  # what closes a call after its arguments
    native: bool = True  # rendered by the model's own chat template

    def structural_tag(self, job: Job) -> dict[str, Any]:
        """The grammar of the job's calls, as an xgrammar structural tag."""
        tools = [t for t in job.tools or [] if job.tool_choice != "function" or t.function.name == job.tool_name]
        tags = [{"type": "tag", "begin": f"{self.prefix}{t.function.name}{self.middle}",
                 "content": {"type": "json_schema", "json_schema": _arguments_schema(t), "max_whitespace_cnt": 1},
                 "end": self.suffix} for t in tools]
        single = not job.parallel_tool_calls
        fmt: dict[str, Any]
        if job.tool_choice == "function":
            fmt = tags[0]
        elif job.tool_choice == "required":
            # Calls from the first token, one per line: no free text a model could ramble in first.
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                   "stop_after_first": single}
        else:
            fmt = {"type": "triggered_tags", "triggers": [self.trigger], "tags": tags, "stop_after_first": single}
        return {"type": "structural_tag", "format": fmt}

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self)


def _arguments_schema(tool: Tool) -> dict[str, Any]:
    """The arguments' JSON schema; a tool without one takes any object."""
    return tool.function.parameters or {"type": "object"}


_JSON_HEAD = r'\s*\{\s*"name"\s*:\s*"(?P<name>[^"\\]{1,64})"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'

_HERMES = ToolFormat("hermes", "<tool_call>", '<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>",
                     re.compile(r"<tool_call>" + _JSON_HEAD), re.compile(r"\s*\}\s*</tool_call>"))
FORMATS: dict[str, ToolFormat] = {
    f.name: f for f in (
        _HERMES,
        replace(_HERMES, name="generic", native=False),  # hermes' text, rendered by llmq rather than the template
        ToolFormat("llama3_json", '{"name": ', '{"name": "', '", "parameters": ', "}",
                   re.compile(r"(?:<\|python_tag\|>)?" + _JSON_HEAD), re.compile(r"\s*\}")),
        ToolFormat("mistral", "[TOOL_CALLS]", '[TOOL_CALLS][{"name": "', '", "arguments": ', "}]",
                   re.compile(r"\[TOOL_CALLS\]\s*\[" + _JSON_HEAD), re.compile(r"\s*\}\s*\]")),
    )
}
# What in a chat template says which format its model was trained on.
_MARKERS = (("[TOOL_CALLS]", "mistral"), ("<tool_call>", "hermes"), ("<|python_tag|>", "llama3_json"))


def format_for(tokenizer: Any, override: str | None = None) -> ToolFormat:
    """The worker's tool-call format: ``--tool-call-parser`` if given, else
    the one the chat template shows, else ``generic``."""
    if override:
        return FORMATS[override]
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # several named templates
        template = " ".join(str(t) for t in dict(template).values())
    for marker, name in _MARKERS:
        if marker in template:
            return FORMATS[name]
    return FORMATS["generic"]


# ------------------------------------------------------------------ prompts


def render_generic(messages: list[Message], tools: list[Tool]) -> list[dict[str, Any]]:
    """The conversation for a template that knows no tools: a system message
    that lists them and shows the call format; earlier calls and their
    results written the same way."""
    listing = "\n".join(json.dumps({"name": t.function.name, "description": t.function.description or "",
                                    "parameters": _arguments_schema(t)}) for t in tools)
    guide = ("You can call these functions. Each line is one function and the JSON schema of its arguments:\n"
             f"{listing}\n"
             "To call a function, answer with exactly:\n"
             '<tool_call>\n{"name": "<function name>", "arguments": <the arguments as a JSON object>}\n</tool_call>\n'
             "The results come back in <tool_response> tags.")
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
        elif m.role == "assistant" and m.tool_calls:
            calls = "\n".join(f'<tool_call>\n{{"name": "{c.function.name}", "arguments": {c.function.arguments}}}'
                              "\n</tool_call>" for c in m.tool_calls)
            out.append({"role": "assistant", "content": (m.content + "\n" if m.content else "") + calls})
        else:
            out.append({"role": m.role, "content": m.content})
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{guide}"}
    else:
        out.insert(0, {"role": "system", "content": guide})
    return out


def render_native(messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation as Hugging Face chat templates take it: tool calls
    with their arguments as objects, tool results with their call's id."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.function.name, "arguments": _as_object(c.function.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out


def _as_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# ------------------------------------------------------------------ parsing


@dataclass
class ToolCallParser:
    """Splits one choice's text, piece by piece, into content and calls.

    Text before a trigger is content (a tail that could still become the
    trigger is held back); after it, the head names the call, the arguments
    object is passed on as it grows (its end found by counting braces
    outside strings), and the tail is dropped. Whitespace between calls is
    not content."""

    fmt: ToolFormat
    calls: int = 0
    _buf: str = ""
    _state: str = "text"  # text, head, args, tail
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _after_call: bool = False  # whitespace right after a call is not content
    _out: list[ToolCallDelta] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content = ""
        while True:
            if self._state == "text":
                if self._after_call:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._after_call = False
                at = self._buf.find(self.fmt.trigger)
                if at < 0:
                    keep = _partial_suffix(self._buf, self.fmt.trigger)
                    content += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content += self._buf[:at]
                self._buf, self._state = self._buf[at:], "head"
            elif self._state == "head":
                m = self.fmt.head.match(self._buf)
                if m is None:
                    if len(self._buf) <= MAX_HEAD_CHARS:
                        break  # the head may still be coming
                    # not a call after all: the trigger was text
                    n = len(self.fmt.trigger)
                    content, self._buf, self._state = content + self._buf[:n], self._buf[n:], "text"
                    continue
                self._out.append(ToolCallDelta(index=self.calls, id=f"call_{uuid.uuid4().hex[:24]}",
                                               name=m.group("name")))
                self.calls += 1
                self._buf, self._state, self._depth = self._buf[m.end():], "args", 0
            elif self._state == "args":
                end = self._scan()
                piece = self._buf[:end]
                if piece:
                    self._out.append(ToolCallDelta(index=self.calls - 1, arguments=piece))
                self._buf = self._buf[end:]
                if self._depth or not piece:
                    break
                self._state = "tail"
            else:  # tail
                m = self.fmt.tail.match(self._buf)
                if m is None and _could_grow(self.fmt.tail, self._buf):
                    break
                self._buf = self._buf[m.end():] if m else self._buf
                self._state, self._after_call = "text", True
        out, self._out = self._out, []
        return content, out

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the choice: held-back text is content, unless calls
        were made (then it is the start of a call the token limit cut off);
        a call cut off in its arguments stays as far as it got."""
        content = self._buf if self._state == "text" and not self.calls else ""
        self._buf = ""
        out, self._out = self._out, []
        return content, out

    def _scan(self) -> int:
        """How much of the buffer belongs to the arguments object: all of it,
        or up to and including the brace that closes it."""
        for i, ch in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self._buf)


def _partial_suffix(text: str, trigger: str) -> int:
    """The length of the longest end of ``text`` that starts ``trigger``."""
    for n in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-n:]):
            return n
    return 0


def _could_grow(pattern: re.Pattern[str], text: str) -> bool:
    """Whether more text could still make ``pattern`` match ``text``'s start:
    tails are short literals with optional whitespace, so compare them
    without the whitespace."""
    literal = re.sub(r"\\s\*|\\", "", pattern.pattern)
    squeezed = re.sub(r"\s+", "", text)
    return literal.startswith(squeezed)
