"""OpenAI's Files API with the real ``openai`` SDK: upload, list, retrieve,
download, delete; every API process sees every file (they live in Redis);
a file over the limit is a 413 and an unknown id a 404, in OpenAI's shape."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.procs import start_api

LINES = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": f"Say {i}."}]}}
         for i in range(3)]
JSONL = ("\n".join(json.dumps(line) for line in LINES) + "\n").encode()


@pytest.fixture(scope="module")
def second_api(stack: Stack) -> Iterator[str]:
    """Another API process on the same Redis, with a 1 KiB file limit."""
    proc, base = start_api({**stack.env, "LLMQ_FILES_MAX_BYTES": "1024"}, name="api-files")
    try:
        yield base
    finally:
        proc.stop()


def test_upload_list_retrieve_download_delete(stack: Stack, second_api: str) -> None:
    client = openai.OpenAI(base_url=stack.v1, api_key="unused", max_retries=0)
    other = openai.OpenAI(base_url=f"{second_api}/v1", api_key="unused", max_retries=0)
    made = client.files.create(file=("batch.jsonl", io.BytesIO(JSONL)), purpose="batch")
    assert made.id.startswith("file-") and made.bytes == len(JSONL) and made.filename == "batch.jsonl"
    assert made.purpose == "batch" and made.expires_at is not None and made.expires_at > made.created_at
    # The other API process serves the same file.
    assert other.files.retrieve(made.id).bytes == len(JSONL)
    assert other.files.content(made.id).read() == JSONL
    assert made.id in [f.id for f in client.files.list(purpose="batch")]
    newer = client.files.create(file=("b.jsonl", io.BytesIO(JSONL)), purpose="batch")
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [newer.id] and page.has_more
    assert client.files.delete(made.id).deleted
    with pytest.raises(openai.NotFoundError) as err:
        other.files.retrieve(made.id)
    assert err.value.code == "file_not_found"
    assert made.id not in [f.id for f in client.files.list()]
    client.files.delete(newer.id)


def test_bad_uploads(stack: Stack, second_api: str) -> None:
    big = httpx.post(f"{second_api}/v1/files", files={"file": ("big.jsonl", b"x" * 2048)}, data={"purpose": "batch"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"
    wrong = httpx.post(f"{stack.base_url}/v1/files", files={"file": ("a.jsonl", JSONL)}, data={"purpose": "vision"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    missing = httpx.post(f"{stack.base_url}/v1/files", data={"purpose": "batch"})
    assert missing.status_code == 400 and "file" in missing.json()["error"]["message"]
    gone = httpx.get(f"{stack.base_url}/v1/files/file-nope/content")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "file_not_found"
