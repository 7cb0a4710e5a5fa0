"""The benchmark's own arithmetic and SSE parsing, plus one real baseline run.
Speed itself is never asserted here: figures are printed by ``python -m bench``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.loadgen import Result, _Response
from bench.sse import SSEParser, StreamRecorder, classify
from bench.stats import RequestResult, itl_per_token, percentile, summarise

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "models" / "smollm2-135m-instruct"


def _chunk(delta: dict[str, object] | None, finish: str | None = None, usage: dict[str, int] | None = None) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                       "model": "m", "choices": choices, "usage": usage}, separators=(",", ":"))


# The shape llmq's API streams (recorded with curl, ids shortened): role first,
# content deltas, a finish chunk with null content, the usage chunk, [DONE].
RECORDED = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"role": None, "content": "Hello"}),
    _chunk({"role": None, "content": "!"}),
    _chunk({"role": None, "content": " How are"}),  # two tokens in one chunk
    _chunk({"role": None, "content": None}, finish="length"),
    _chunk(None, usage={"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}),
    "[DONE]",
]


def _stream(sep: bytes) -> bytes:
    return b"".join(b"data: " + d.encode() + sep + sep for d in RECORDED)


# -- percentiles -------------------------------------------------------------

def test_percentile_matches_numpy_linear() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 25) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile(list(map(float, range(1, 101))), 99) == pytest.approx(99.01)


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# -- inter-token latency -------------------------------------------------------

def test_itl_one_token_per_chunk() -> None:
    assert itl_per_token([0.0, 0.1, 0.3, 0.6], 4) == pytest.approx([0.1, 0.2, 0.3])


def test_itl_normalised_when_chunks_hold_several_tokens() -> None:
    # 3 chunks, 6 tokens: 2 tokens a chunk, so each gap counts as two tokens' time.
    assert itl_per_token([0.0, 0.2, 0.6], 6) == pytest.approx([0.1, 0.2])


def test_itl_needs_two_chunks_and_never_inflates() -> None:
    assert itl_per_token([], 5) == []
    assert itl_per_token([1.0], 5) == []
    # A count below the chunk count is wrong; gaps stay as measured.
    assert itl_per_token([0.0, 0.5], 1) == pytest.approx([0.5])
    assert itl_per_token([0.0, 0.5], None) == pytest.approx([0.5])


def test_summarise_counts_only_good_requests() -> None:
    good = RequestResult(t_send=0.0, t_first=0.5, chunk_times=[0.5, 0.6, 0.7], completion_tokens=3,
                         prompt_tokens=10, finish_reason="length")
    good2 = RequestResult(t_send=1.0, t_first=2.0, chunk_times=[2.0, 2.2], completion_tokens=2,
                          prompt_tokens=10, finish_reason="stop")
    bad = RequestResult(t_send=0.0, error="http_429")
    f = summarise("http", [good, good2, bad], wall_s=2.5, concurrency=3, max_tokens=3)
    assert (f.requests, f.ok, f.errors, f.error_kinds) == (3, 2, 1, {"http_429": 1})
    assert f.output_tokens == 5
    assert f.tokens_per_s == pytest.approx(2.0)
    assert f.requests_per_s == pytest.approx(0.8)
    assert f.ttft_p50_s == pytest.approx(0.75)
    assert f.itl_p50_s == pytest.approx(0.1)  # gaps 0.1, 0.1, 0.2
    assert f.hit_max_tokens == 1
    assert f.mean_prompt_tokens == 10


# -- SSE ---------------------------------------------------------------------

@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_parser_any_split_any_line_end(sep: bytes, step: int) -> None:
    raw = _stream(sep)
    p = SSEParser()
    events: list[str] = []
    for i in range(0, len(raw), step):
        events += p.feed(raw[i : i + step])
    events += p.close()
    assert events == RECORDED


def test_parser_comments_multiline_and_unterminated() -> None:
    p = SSEParser()
    raw = b": ping\r\n\r\nevent: x\ndata: a\ndata:b\nid: 3\n\ndata: lost"
    assert p.feed(raw) == ["a\nb"]
    assert p.close() == []  # no blank line after it: not an event


def test_parser_keeps_multibyte_characters_split_across_chunks() -> None:
    raw = ("data: " + json.dumps({"x": "é✓"}, ensure_ascii=False) + "\n\n").encode()
    p = SSEParser()
    out = [e for b in raw for e in p.feed(bytes([b]))]
    assert json.loads(out[0]) == {"x": "é✓"}


def test_classify() -> None:
    assert classify("[DONE]").done
    c = classify(RECORDED[3])
    assert (c.content, c.finish_reason, c.usage) == (" How are", None, None)
    assert classify(RECORDED[4]).finish_reason == "length"
    assert classify(RECORDED[5]).usage == {"prompt_tokens": 31, "completion_tokens": 4, "total_tokens": 35}
    err = json.dumps({"error": {"message": "m", "type": "server_error", "code": "engine_error"}})
    assert classify(err).error == "event:engine_error"
    assert classify("{not json").error == "bad_json"


def test_recorder_on_recorded_stream() -> None:
    rec = StreamRecorder(t_send=10.0)
    for i, data in enumerate(RECORDED):
        rec.on_data(10.0 + 0.5 + 0.1 * i, data)
    r = rec.finish(11.5)
    assert r.ok
    assert r.ttft == pytest.approx(0.6)  # the role chunk (i=0) has empty content; "Hello" is i=1
    assert r.chunk_times == pytest.approx([10.6, 10.7, 10.8])
    assert (r.completion_tokens, r.prompt_tokens, r.finish_reason) == (4, 31, "length")
    # 4 tokens over 3 chunks: each 0.1 s gap is 4/3 tokens.
    assert itl_per_token(r.chunk_times, r.completion_tokens) == pytest.approx([0.075, 0.075])


@pytest.mark.parametrize(
    ("payloads", "error"),
    [
        (RECORDED[:-1], "no_done"),  # cut off before [DONE]
        (RECORDED[:5] + ["[DONE]"], "no_usage"),  # include_usage ignored: tokens cannot be counted
        (RECORDED[:2] + [json.dumps({"error": {"type": "server_error", "code": "worker_lost"}}), "[DONE]"],
         "event:worker_lost"),
    ],
)
def test_recorder_errors(payloads: list[str], error: str) -> None:
    rec = StreamRecorder(t_send=0.0)
    for data in payloads:
        rec.on_data(1.0, data)
    assert rec.finish(2.0).error == error


# -- the real baseline ---------------------------------------------------------

@pytest.mark.skipif(not (DEMO / "config.json").is_file(),
                    reason=f"demo model not built at {DEMO} (run `llmq demo-model` or `make test`)")
def test_baseline_real_model_one_request() -> None:
    from bench.baseline import BaselineConfig, run

    f = run(BaselineConfig(model_path=str(DEMO), prompt="Write a long story about a lighthouse keeper.",
                           requests=1, max_tokens=8, warmup=0, seed=0))
    assert (f.requests, f.ok, f.errors) == (1, 1, 0)
    # 8 tokens, or fewer only if the model stopped on EOS.
    assert f.output_tokens == 8 or (0 < f.output_tokens < 8 and f.hit_max_tokens == 0)
    assert f.tokens_per_s > 0 and f.requests_per_s > 0 and f.wall_s > 0
    assert f.ttft_p50_s is not None and f.ttft_p50_s > 0
    assert f.ttft_p99_s is not None and f.ttft_p99_s >= f.ttft_p50_s
    if f.output_tokens > 1:
        assert f.itl_p50_s is not None and f.itl_p50_s > 0
    assert f.mean_prompt_tokens is not None and f.mean_prompt_tokens > 0


# -- the engine profile and the chat-turns run -------------------------------

@pytest.mark.skipif(not (DEMO / "config.json").is_file(),
                    reason=f"demo model not built at {DEMO} (run `llmq demo-model` or `make test`)")
def test_profile_runs_the_real_engine_and_accounts_for_its_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.profile import PHASE_HELP, ProfileConfig, render, run

    result = run(ProfileConfig(model_path=str(DEMO), batch=2, seconds=2.0, warmup_s=1.0, max_tokens=8))
    assert result["steps"] > 0 and result["output_tokens_per_s"] > 0
    assert result["events_received"] > 0  # published through the real Redis and read back
    assert set(result["phases_ms"]) == set(PHASE_HELP)
    assert result["phases_ms"]["forward"] > 0
    assert result["step_ms"] >= result["phases_ms"]["forward"]
    assert 0 < result["mean_decode_rows"] <= 2
    render(result)
    out = capsys.readouterr().out
    assert "forward" in out and "busy step" in out


@pytest.mark.e2e
def test_turns_sends_turn_one_as_history_of_turn_two(stack) -> None:  # type: ignore[no-untyped-def]
    from bench.turns import TurnsConfig, run

    result = run(TurnsConfig(base_url=stack.v1, model=stack.model, prefix_tokens=300, conversations=1, max_tokens=8))
    print(result)
    assert result["turn1_prompt_tokens"] >= 250  # type: ignore[operator]
    assert result["turn2_prompt_tokens"] > result["turn1_prompt_tokens"]  # type: ignore[operator]
    assert result["turn1_ttft_p50_s"] and result["turn2_ttft_p50_s"]


def events(*chunks: str) -> bytes:
    body = b"".join(f"data: {c}\r\n\r\n".encode() for c in chunks)
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + \
        f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def test_the_load_generator_parses_any_split_of_a_stream() -> None:
    chunk = '{{"choices":[{{"index":0,"delta":{{"content":"{}"}}}}]}}'
    raw = events('{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', chunk.format("Hel"),
                 chunk.format("lo"), '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}', "[DONE]")
    for size in (1, 7, len(raw)):
        result = Result(t_send=0.0)
        response = _Response(result)
        for i in range(0, len(raw), size):
            response.parser.feed_data(raw[i:i + size])
        assert response.done and response.parser.get_status_code() == 200
        assert (len(result.chunk_times), result.completion_tokens, result.error) == (2, 2, None), size


def test_the_closed_loop_client_reads_streams_and_counts_with_its_own_tokenizer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/closedloop.py against an in-memory transport (a pure unit test):
    text is put together from the deltas, counted by the function given,
    a failed request is an error, not tokens."""
    import asyncio

    import httpx

    from bench import closedloop

    calls = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                  {"choices": [{"delta": {"content": "Paris"}}]}, {"choices": [{"delta": {"content": " is it."}}]}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    real = httpx.AsyncClient

    def client(**kw: object) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(answer), **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx, "AsyncClient", client)
    result = asyncio.run(closedloop.run("http://x/v1", "m", 2, 6, 16, lambda text: len(text.split())))
    assert (result.requests, result.errors) == (6, 1)  # the warm-up is the first call, not counted
    assert result.output_tokens == 5 * 3 and result.tokens_per_answer == 3.0  # "Paris is it." is 3 words
    assert result.ttft_p50_s > 0 and result.tokens_per_s > 0


def test_fairness_judges_each_policy_against_b_alone_and_a_alone() -> None:
    from bench.fairness import judge
    from bench.loadgen import lengths

    def load(tps: float, ttft: float | None = 0.04, errors: int = 0) -> dict[str, object]:
        return {"tokens_per_s": tps, "ttft_p50_s": ttft, "errors": errors}

    phases = {"b_alone": {"b": load(100.0, 0.04)}, "a_alone": {"a": load(800.0)},
              "fair": {"a": load(700.0), "b": load(90.0, 0.05)}, "fcfs": {"a": load(790.0), "b": load(9.0, 6.0, 1)}}
    fair, fcfs = judge(phases, "fair"), judge(phases, "fcfs")
    assert fair["b_ttft_ratio"] == pytest.approx(1.25) and fair["b_share_ratio"] == pytest.approx(0.9)
    assert fair["throughput_ratio"] == pytest.approx(790 / 800) and fair["errors"] == 0
    # B's fair share is the smaller of its own demand and half of the total.
    assert fcfs["b_fair_share_tokens_per_s"] == 100.0 and fcfs["b_share_ratio"] == pytest.approx(0.09)
    assert fcfs["errors"] == 1
    assert lengths(64, 0) == [64] and lengths(100, 0.5) == [50, 62, 75, 88, 100, 112, 125, 138, 150]


def test_the_lora_run_takes_the_adapters_in_turn_and_can_ban_the_end_token() -> None:
    from bench.http import HttpConfig, payload

    cfg = HttpConfig(base_url="http://x/v1", model="base", prompt="Hi", models=("a", "b", "c"), ban_token=2)
    assert [payload(cfg, number=n)["model"] for n in range(4)] == ["a", "b", "c", "a"]
    assert payload(cfg, number=0)["logit_bias"] == {"2": -100}
    plain = HttpConfig(base_url="http://x/v1", model="base", prompt="Hi")
    assert payload(plain, number=5)["model"] == "base" and "logit_bias" not in payload(plain)
