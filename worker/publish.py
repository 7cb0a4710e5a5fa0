"""Publishing events to API reply channels: a whole engine step in one
pipeline, never one round trip per token."""

from __future__ import annotations

import redis

from collections.abc import Sequence

from broker.schemas import AnyEvent


class Publisher:
    def __init__(self, r: redis.Redis) -> None:
        self._redis = r

    def publish(self, events: Sequence[tuple[str, AnyEvent]]) -> list[int]:
        """Publish in order; returns, per event, how many subscribers got it."""
        with self._redis.pipeline(transaction=False) as pipe:
            for channel, event in events:
                pipe.publish(channel, event.model_dump_json())
            return [int(n) for n in pipe.execute()]
