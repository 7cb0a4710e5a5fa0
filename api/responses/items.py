"""The input items of a Responses API request (messages, and the
``function_call`` / ``function_call_output`` items of a tool round trip):
their wire models, how ``input_items`` lists them, and the chat messages
they become for a job. Content that is not text (images, files, audio) is
refused with a 400 naming the part."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, ValidationError

from api.errors import invalid, unsupported, validation_error
from api.wire import Request
from broker.schemas import FunctionCall, Message, ToolCall


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(parts: str | list[dict[str, Any]], at: str, role: str, field: str = "content") -> str:
    """A message's content as text: a string, or text parts. Anything else
    (images, files, audio) is refused, naming the part."""
    if isinstance(parts, str):
        return parts
    allowed = ("input_text", "output_text") if role == "assistant" else ("input_text",)
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in allowed and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise unsupported(f"{at}.{field}.{j}", f"Content of type '{kind}' cannot be read by the models served "
                              "here; send text.")
        else:
            raise invalid(f"{at}.{field}.{j}", f"'{at}.{field}.{j}' must be a text part of type "
                          f"{' or '.join(repr(a) for a in allowed)}.")
    return "".join(texts)


class MessageItem(Request):
    """An input message: ``{"role", "content"}``, optionally ``type: "message"``
    (OpenAI's EasyInputMessage and Message, and an earlier output message)."""

    type: Literal["message"] | None = None
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self, at: str) -> str:
        return _text_of(self.content, at, self.role)

    def listed(self, at: str) -> dict[str, Any]:
        """The item as ``input_items`` lists it: OpenAI's message item, with an id."""
        text = self.text(at)
        part = ({"type": "output_text", "text": text, "annotations": [], "logprobs": []} if self.role == "assistant"
                else {"type": "input_text", "text": text})
        return {"id": self.id or new_item_id("msg"), "type": "message", "role": self.role, "content": [part],
                "status": "completed"}


class FunctionCallItem(Request):
    """A call the model made in an earlier turn, sent back with its result."""

    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def listed(self, at: str) -> dict[str, Any]:
        return {"id": self.id or new_item_id("fc"), "type": "function_call", "call_id": self.call_id,
                "name": self.name, "arguments": self.arguments, "status": "completed"}


class FunctionCallOutputItem(Request):
    """A tool's result: goes to the template as a ``tool`` message."""

    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[dict[str, Any]]
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self, at: str) -> str:
        return _text_of(self.output, at, "tool", "output")

    def listed(self, at: str) -> dict[str, Any]:
        return {"id": self.id or new_item_id("fco"), "type": "function_call_output", "call_id": self.call_id,
                "output": self.text(at), "status": "completed"}


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


def parse_item(raw: Any, at: str) -> InputItem:
    if not isinstance(raw, dict):
        raise invalid(at, f"'{at}' must be an object: a message or a function_call / function_call_output item.")
    kind = raw.get("type")
    models: dict[Any, type[InputItem]] = {None: MessageItem, "message": MessageItem, "function_call": FunctionCallItem,
                                          "function_call_output": FunctionCallOutputItem}
    model = models.get(kind) if isinstance(kind, str | None) else None
    if model is not None:
        try:
            item = model.model_validate(raw)
        except ValidationError as exc:
            # Named from the request's root ("input.2.call_id"), as the routes name every field.
            raise validation_error([{**e, "loc": (*at.split("."), *e["loc"])} for e in exc.errors()]) from None
        if not isinstance(item, FunctionCallItem):
            item.text(at)  # a part that is not text is refused now, before any job
        return item
    raise unsupported(f"{at}.type", f"Input items of type '{kind}' are not supported; send messages, "
                      "function_call and function_call_output items.")


def to_messages(items: list[InputItem]) -> list[Message]:
    """Input items as chat messages: consecutive function calls join the
    assistant turn before them (OpenAI's ``tool_calls``), outputs become
    ``tool`` messages."""
    out: list[Message] = []
    for i, item in enumerate(items):
        at = f"input.{i}"
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append(Message(role=role, content=item.text(at)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and i > 0 and not isinstance(
                    items[i - 1], FunctionCallOutputItem):
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(Message(role="assistant", content="", tool_calls=[call]))
        else:
            out.append(Message(role="tool", content=item.text(at), tool_call_id=item.call_id))
    return out
