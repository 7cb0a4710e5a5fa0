"""The engine in-process with the real model: jobs of one model share
engine steps, and each step goes out as one publish call (one Redis
pipeline) carrying one event per job that advanced."""

from __future__ import annotations

import threading
import time

import pytest

from broker.schemas import Delta, Done, Job, Message, Sampling
from tests.procs import DEMO_MODEL_DIR
from worker.engines.transformers import TransformersOptions
from worker.engines.transformers.detok import IncrementalDetokenizer
from worker.engines.transformers.engine import Engine
from worker.engines.transformers.runs import Run
from worker.loading import ModelSpec
from worker.prompts import prompt_ids


DEMO = ModelSpec(path=str(DEMO_MODEL_DIR), names=("demo",))


class RecordingPublisher:
    """Stands in for Redis: records each publish call (one per pipeline)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, object]]] = []
        self.lock = threading.Lock()

    def publish(self, events):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls.append(list(events))
        return [1] * len(events)

    def send(self, events):  # type: ignore[no-untyped-def]
        self.publish(events)


@pytest.fixture(scope="module")
def engine_and_publisher():  # type: ignore[no-untyped-def]
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")
    pub = RecordingPublisher()
    engine = Engine(DEMO, TransformersOptions(max_batch_size=8, kv_cache_tokens=8 * 512), pub)  # type: ignore[arg-type]
    engine.start()
    yield engine, pub
    engine.stop()


def make_run(engine: Engine, i: int, max_tokens: int, endless: bool = False) -> Run:
    """``endless``: the end-of-turn tokens are banned, so it runs to max_tokens."""
    bias = {t: -100.0 for t in engine.lm.eos_token_ids} if endless else None
    job = Job(job_id=f"job-{i}", model="demo", kind="chat", reply_channel=f"chan-{i % 2}", submitted_at=time.time(),
              messages=[Message(role="user", content=f"Count from {i} to {i + 20}.")],
              sampling=Sampling(temperature=0, max_tokens=max_tokens, logit_bias=bias))
    ids = prompt_ids(engine.lm.tokenizer, job, engine.lm.vocab_size)
    return Run(job=job, index=0, prompt_ids=ids, max_tokens=max_tokens, queue_s=0.0,
               detok=IncrementalDetokenizer(engine.lm.tokenizer, ids))


def test_jobs_share_steps_and_each_step_is_one_publish(engine_and_publisher) -> None:  # type: ignore[no-untyped-def]
    engine, pub = engine_and_publisher
    pub.calls.clear()
    runs = [make_run(engine, i, max_tokens=16) for i in range(4)]
    for run in runs:
        engine.add(run)
    for run in runs:
        assert run.ended.wait(120)
    sizes = [len({ev.job_id for _, ev in call}) for call in pub.calls]
    tokens = sum(run.tokens for run in runs)
    print(f"{tokens} tokens for 4 jobs in {len(pub.calls)} publish calls; jobs per call: {sizes}")
    assert max(sizes) == 4  # all four advanced in one step
    assert len(pub.calls) < tokens / 2  # per step, not per token
    for run in runs:
        events = [ev for call in pub.calls for ch, ev in call if ev.job_id == run.job.job_id]
        assert all(ch == run.job.reply_channel for call in pub.calls for ch, ev in call if ev.job_id == run.job.job_id)
        assert [ev.seq for ev in events] == list(range(1, len(events) + 1))  # 0 is Started, sent by the runtime
        assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens == run.tokens
        text = "".join(ev.text for ev in events if isinstance(ev, Delta))
        assert text.strip()


def test_cancel_frees_the_slot_within_a_step(engine_and_publisher) -> None:  # type: ignore[no-untyped-def]
    engine, pub = engine_and_publisher
    run = make_run(engine, 9, max_tokens=400)
    engine.add(run)
    while run.tokens < 3:
        time.sleep(0.01)
    assert engine.emitter.running == 1
    assert engine.cancel(run.job.job_id)
    assert engine.emitter.running == 0 and run.finish_reason == "cancelled"
    at_cancel = run.tokens
    time.sleep(0.5)
    late = [ev for call in pub.calls for _, ev in call if ev.job_id == run.job.job_id and isinstance(ev, Delta)
            and ev.completion_tokens > at_cancel + 1]
    assert late == []  # at most the one chunk already in flight


def _answer(engine: Engine, pub: RecordingPublisher, run: Run) -> str:
    return "".join(ev.text for call in pub.calls for _, ev in call
                   if ev.job_id == run.job.job_id and isinstance(ev, Delta))


def make_long_run(engine: Engine, i: int, words: int, max_tokens: int) -> Run:
    text = " ".join(f"line {n} of logbook {i}: the lamp was lit." for n in range(words // 8))
    job = Job(job_id=f"long-{i}-{time.monotonic_ns()}", model="demo", kind="chat", reply_channel="chan",
              submitted_at=time.time(), messages=[Message(role="user", content=text + " Summarise.")],
              sampling=Sampling(temperature=0, max_tokens=max_tokens))
    ids = prompt_ids(engine.lm.tokenizer, job, engine.lm.vocab_size)
    return Run(job=job, index=0, prompt_ids=ids, max_tokens=max_tokens, queue_s=0.0,
               detok=IncrementalDetokenizer(engine.lm.tokenizer, ids))


def test_prefix_cache_serves_a_repeated_prompt_and_changes_no_token(  # type: ignore[no-untyped-def]
        engine_and_publisher) -> None:
    engine, pub = engine_and_publisher
    first = make_long_run(engine, 1, 200, 24)
    engine.add(first)
    assert first.ended.wait(120)
    hits = engine.profile.snapshot().cached_tokens
    again = make_long_run(engine, 1, 200, 24)
    engine.add(again)
    assert again.ended.wait(120)
    reused = engine.profile.snapshot().cached_tokens - hits
    print(f"prompt {len(again.prompt_ids)} tokens, {reused} served from the prefix cache")
    bs = engine.cache.block_size
    assert reused == (len(again.prompt_ids) - 1) // bs * bs  # every full block but the last token's
    assert _answer(engine, pub, again) == _answer(engine, pub, first) != ""


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    """With a 64-token step budget a ~700-token prompt takes ~11 steps to
    prefill; a stream already decoding gets a token in each of them, and the
    chunked prompt's answer is the one an unchunked prefill gives."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")
    answers = []
    for budget in (64, 4096):
        pub = RecordingPublisher()
        options = TransformersOptions(max_batch_size=4, kv_cache_tokens=4096, max_step_tokens=budget,
                                      prefix_caching=False)
        engine = Engine(DEMO, options, pub)  # type: ignore[arg-type]
        engine.start()
        try:
            stream = make_run(engine, 3, max_tokens=300, endless=True)
            engine.add(stream)
            while stream.tokens < 2:
                time.sleep(0.005)
            long = make_long_run(engine, 2, 400, 8)
            before = stream.tokens
            engine.add(long)
            while long.first_token_at is None and not long.ended.is_set():
                time.sleep(0.002)
            during = stream.tokens - before
            steps = -(-len(long.prompt_ids) // (budget - 1))
            print(f"budget {budget}: prompt {len(long.prompt_ids)} tokens in >= {steps} steps; "
                  f"the other stream got {during} tokens meanwhile")
            if budget == 64:
                assert during >= steps - 2
            assert long.ended.wait(120)
            answers.append(_answer(engine, pub, long))
            engine.cancel(stream.job.job_id)
        finally:
            engine.stop()
    assert answers[0] == answers[1] != ""


def test_sequences_preempted_for_memory_finish_with_the_same_tokens() -> None:
    """A cache too small for both sequences at once: the newer one is
    preempted and recomputed later; each answer equals its answer alone."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")

    def answers(runs_at_once: int, kv_tokens: int) -> tuple[list[str], int]:
        pub = RecordingPublisher()
        options = TransformersOptions(max_batch_size=4, kv_cache_tokens=kv_tokens, prefix_caching=False)
        engine = Engine(DEMO, options, pub)  # type: ignore[arg-type]
        engine.start()
        try:
            runs = [make_run(engine, 40 + i, max_tokens=80, endless=True) for i in range(2)]
            for group in ([runs] if runs_at_once == 2 else [[r] for r in runs]):
                for r in group:
                    engine.add(r)
                for r in group:
                    assert r.ended.wait(120)
            return [_answer(engine, pub, r) for r in runs], engine.preemptions
        finally:
            engine.stop()

    alone, _ = answers(1, 4096)
    squeezed, preemptions = answers(2, 12 * 16)  # 12 blocks; each run needs 8 at its end
    print(f"{preemptions} preemption(s)")
    assert preemptions >= 1
    assert squeezed == alone and all(alone)
