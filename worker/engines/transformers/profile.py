"""Where an engine's time goes, step by step.

The engine thread times each step's phases (scheduling and building the
step's layout, the model's forward, sampling, bookkeeping after it) and the
time it waited with nothing to run; the pump thread times detokenizing and
publishing. ``llmq bench profile`` prints the totals per step; the
heartbeat carries the mean step time.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, fields

PHASES = ("schedule", "forward", "sample", "update", "publish", "idle")


@dataclass
class StepTotals:
    steps: int = 0
    decode_rows: int = 0  # sequences that got one token
    sampled: int = 0  # tokens chosen (decode rows, and prompts that finished in the step)
    prefill_tokens: int = 0  # prompt tokens computed
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    schedule: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    update: float = 0.0
    publish: float = 0.0  # pump thread: detokenize, stop strings, one Redis pipeline
    idle: float = 0.0

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {p: 1000 * getattr(self, p) / n for p in PHASES}


class StepProfile:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = StepTotals()
        self.recent: deque[float] = deque(maxlen=32)  # busy time of recent steps, for the heartbeat

    def step(self, *, decode_rows: int, prefill_tokens: int, sampled: int, schedule: float, forward: float,
             sample: float, update: float) -> None:
        with self._lock:
            t = self._totals
            t.steps += 1
            t.decode_rows += decode_rows
            t.sampled += sampled
            t.prefill_tokens += prefill_tokens
            t.schedule += schedule
            t.forward += forward
            t.sample += sample
            t.update += update
        self.recent.append(schedule + forward + sample + update)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            setattr(self._totals, phase, getattr(self._totals, phase) + seconds)

    def add_cached(self, tokens: int) -> None:
        with self._lock:
            self._totals.cached_tokens += tokens

    def snapshot(self, *, reset: bool = False) -> StepTotals:
        with self._lock:
            snap = StepTotals(**{f.name: getattr(self._totals, f.name) for f in fields(StepTotals)})
            if reset:
                self._totals = StepTotals()
        return snap

    def mean_step_s(self) -> float:
        times = list(self.recent)
        return sum(times) / len(times) if times else 0.0
