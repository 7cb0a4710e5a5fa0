"""Publishing events to API reply channels: a whole engine step in one
pipeline, never one round trip per token."""

from __future__ import annotations

import redis

from broker.schemas import Delta, Done, Error, Started


class Publisher:
    def __init__(self, r: redis.Redis) -> None:
        self._redis = r

    def publish(self, events: list[tuple[str, Started | Delta | Done | Error]]) -> list[int]:
        """Publish in order; returns, per event, how many subscribers got it."""
        with self._redis.pipeline(transaction=False) as pipe:
            for channel, event in events:
                pipe.publish(channel, event.model_dump_json())
            return [int(n) for n in pipe.execute()]
