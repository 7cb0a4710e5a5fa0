"""The engine in-process with the real model: jobs of one model share
engine steps, and each step goes out as one publish call (one Redis
pipeline) carrying one event per job that advanced."""

from __future__ import annotations

import threading
import time

import pytest

from broker.schemas import Delta, Done, Job, Message, Sampling
from tests.procs import DEMO_MODEL_DIR
from worker.detok import IncrementalDetokenizer
from worker.engine import Engine, Run
from worker.loading import ModelSpec, load
from worker.prompts import prompt_ids


class RecordingPublisher:
    """Stands in for Redis: records each publish call (one per pipeline)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, object]]] = []
        self.lock = threading.Lock()

    def publish(self, events):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls.append(list(events))
        return [1] * len(events)


@pytest.fixture(scope="module")
def engine_and_publisher():  # type: ignore[no-untyped-def]
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.skip(f"{DEMO_MODEL_DIR} not built (make test builds it)")
    lm = load(ModelSpec(path=str(DEMO_MODEL_DIR), names=("demo",)))
    pub = RecordingPublisher()
    engine = Engine(lm, pub, max_batch=8, kv_cache_tokens=8 * 512)  # type: ignore[arg-type]
    engine.start()
    yield engine, pub
    engine.stop()


def make_run(engine: Engine, i: int, max_tokens: int) -> Run:
    job = Job(job_id=f"job-{i}", model="demo", kind="chat", reply_channel=f"chan-{i % 2}", submitted_at=time.time(),
              messages=[Message(role="user", content=f"Count from {i} to {i + 20}.")],
              sampling=Sampling(temperature=0, max_tokens=max_tokens))
    ids = prompt_ids(engine.lm.tokenizer, job, engine.lm.vocab_size)
    return Run(job=job, index=0, prompt_ids=ids, max_tokens=max_tokens, queue_s=0.0,
               detok=IncrementalDetokenizer(engine.lm.tokenizer, ids))


def test_jobs_share_steps_and_each_step_is_one_publish(engine_and_publisher) -> None:  # type: ignore[no-untyped-def]
    engine, pub = engine_and_publisher
    pub.calls.clear()
    runs = [make_run(engine, i, max_tokens=16) for i in range(4)]
    for run in runs:
        engine.submit(run)
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
    engine.submit(run)
    while run.tokens < 3:
        time.sleep(0.01)
    assert engine.running == 1
    assert engine.cancel(run.job.job_id)
    assert engine.running == 0 and run.finish_reason == "cancelled"
    at_cancel = run.tokens
    time.sleep(0.5)
    late = [ev for call in pub.calls for _, ev in call if ev.job_id == run.job.job_id and isinstance(ev, Delta)
            and ev.completion_tokens > at_cancel + 1]
    assert late == []  # at most the one chunk already in flight
