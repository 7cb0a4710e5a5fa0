"""What every request model shares, whatever its surface: unknown fields
are refused (a typo gets a 400 naming it), and text that is not valid
Unicode is refused before any other check, naming where it is."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, model_validator

from api.errors import APIError


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may carry a lone UTF-16 surrogate (escaped as "\ud800", or as the
        # bytes ED A0 80, which Python's json decodes); Python then holds a string
        # that no tokenizer, Redis client or UTF-8 encoder accepts.
        where = lone_surrogate(data)
        if where is not None:
            param = ".".join(where) or None
            what = f"'{param}'" if param else "The request body"
            raise APIError(400, f"{what} is not valid UTF-8 text: it holds a lone surrogate (U+D800 to U+DFFF).",
                           param=param, code="invalid_value")
        return data


def lone_surrogate(data: Any) -> tuple[str, ...] | None:
    """The path to a string (value or key) that is not valid Unicode, or None.
    A loop, not recursion: the JSON may be nested as deep as the parser allows."""
    todo: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            if not _encodes(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not _encodes(key):
                    return path  # never echo the key itself: it cannot be encoded
                if isinstance(item, str | dict | list):
                    todo.append((item, (*path, str(key))))
        elif isinstance(value, list):
            todo.extend((item, (*path, str(i))) for i, item in enumerate(value) if isinstance(item, str | dict | list))
    return None


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


ToolChoiceMode = Literal["none", "auto", "required"]
TOOL_CHOICE_MODES: tuple[str, ...] = get_args(ToolChoiceMode)
# What the job carries: a mode, or "function" with the function's name beside it.
ToolChoice = Literal[ToolChoiceMode, "function"]

# Below this the sampler's logits / temperature overflows float32 (1e-300 is 0
# in float32), and the limit is greedy anyway: such temperatures mean 0.
GREEDY_BELOW_TEMPERATURE = 1e-5
