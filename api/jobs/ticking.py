"""The loop of a keeper: one tick every so often, or at once when woken.

Both keepers (``api/batches/keeper.py``, ``api/responses/keeper.py``) run in
every API process and must outlive a Redis outage without flooding the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError


async def tick_forever(tick: Callable[[], Awaitable[None]], wake: asyncio.Event, interval_s: float,
                       log: logging.Logger, name: str, waiting: str) -> None:
    """Call ``tick`` every ``interval_s``, or as soon as ``wake`` is set.
    A Redis outage is logged when it starts and when it ends, not every
    tick; any other failure is logged and the next tick retries."""
    unreachable = False
    while True:
        wake.clear()
        try:
            await tick()
            if unreachable:
                log.info("%s: Redis reachable again", name)
            unreachable = False
        except (RedisError, OSError) as exc:
            if not unreachable:
                log.warning("%s: Redis unreachable (%s); %s wait until it is back", name, exc, waiting)
            unreachable = True
        except Exception:
            log.exception("%s: a tick failed; the next one retries", name)
        try:
            await asyncio.wait_for(wake.wait(), interval_s)
        except TimeoutError:
            pass
