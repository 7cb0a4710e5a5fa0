"""A streamed text-only delta is framed around its text (``answers.text_frame``)
instead of built as pydantic models per token: the event must be the very
bytes the models would have made, for any text a tokenizer can produce."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from api.completions.answers import ChatShape, CompletionShape
from api.sse import sse_event
from broker.schemas import Delta, Job

TEXTS = [chr(c) for c in range(128)] + [
    "Hello", " world", "héllo", "日本語", "🎉 emoji", 'a "quote" and a \\ backslash', "\n\t\r\b\f",
    "\u2028\u2029", "</script>", "{\"content\":\"\"}", "\ufeff", "\U0001f600\u0301",
]


@pytest.mark.parametrize("shape", [ChatShape(), CompletionShape()], ids=["chat", "completion"])
def test_a_framed_text_delta_is_the_chunk_pydantic_makes(shape: ChatShape | CompletionShape) -> None:
    job = Job(job_id="chatcmpl-1", model='odd "model" name', kind="chat", messages=[], reply_channel="",
              submitted_at=time.time(), n=3)
    run = SimpleNamespace(job=job, job_id="chatcmpl-public", created=1765000000)
    for index in range(3):
        head, tail = shape.text_frame(run, index)  # type: ignore[arg-type]
        for text in TEXTS:
            ev = Delta(job_id=job.job_id, seq=1, index=index, text=text, completion_tokens=1)
            framed = head + json.dumps(text, ensure_ascii=False).encode() + tail
            built = sse_event(shape.delta(run, ev))  # type: ignore[arg-type]
            assert framed == built, (text, framed, built)
            assert json.loads(framed.removeprefix(b"data: "))["choices"][0]["index"] == index
