"""Prompt token ids for a job: the tokenizer's own chat template for chat
jobs, plain encoding (or the ids as given) for completions. A chat job's
tools go to the template (``tools=``) when the model's tool format is its
own, else into llmq's generic system message (``worker/toolcalls.py``)."""

from __future__ import annotations

from typing import Any

from broker.schemas import Job
from worker.toolcalls import FORMATS, ToolFormat, render_generic, render_native


class PromptError(Exception):
    """The prompt cannot be built (bad template, token ids out of range)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def prompt_ids(tokenizer: Any, job: Job, vocab_size: int, tools: ToolFormat = FORMATS["generic"]) -> list[int]:
    if job.messages is not None:  # chat jobs, and count jobs of a conversation
        extra: dict[str, Any] = {}
        if job.tools and not tools.native:
            messages = render_generic(job.messages, job.tools)
        else:
            messages = render_native(job.messages)
            if job.tools:
                extra["tools"] = [t.model_dump(exclude_none=True) for t in job.tools]
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        except Exception as exc:  # jinja raises TemplateError and plain exceptions alike
            raise PromptError(f"The model's chat template rejected these messages: {exc}", "messages") from exc
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]
    if isinstance(job.prompt, list):
        bad = [i for i in job.prompt if not 0 <= i < vocab_size]
        if bad:
            raise PromptError(f"Token id {bad[0]} is outside this model's vocabulary (0..{vocab_size - 1}).", "prompt")
        return list(job.prompt)
    return [int(i) for i in tokenizer.encode(job.prompt or "", add_special_tokens=True)]
