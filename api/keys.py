"""Named API keys and their limits per minute, enforced in Redis so that
every API process counts against the same budget.

Keys come from ``LLMQ_API_KEYS`` (named ``key-1``, ``key-2``... and
unlimited) and from the TOML file ``LLMQ_API_KEYS_FILE``::

    [keys.team-a]
    key = "sk-team-a-..."
    requests_per_minute = 60
    tokens_per_minute = 40000
    max_queue_time_s = 30      # optional: this key's jobs wait at most 30 s for a worker
    weight = 2                 # optional: twice a default key's share of tokens when both wait

Logs and ``/metrics`` carry the name, never the key.

Limits count in fixed one-minute windows (one Redis counter per key, kind
and minute, with a TTL). A request is admitted while the window's requests
are under the limit and its tokens (prompt and completion of the requests
that finished in it) are under theirs; its own tokens are counted when it
ends, as they are only known then. Every answer to a limited key carries
OpenAI's ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*`` headers; over a limit it is a 429
``rate_limit_exceeded``.
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import APIError
from broker.keys import Keys
from broker.settings import Settings

WINDOW_S = 60


class NamedKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: str = Field(min_length=1, repr=False)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    # How long this key's jobs may wait in a queue unless a request says
    # (api/jobs/waiting.py); None: the server's LLMQ_MAX_QUEUE_TIME_S.
    max_queue_time_s: float | None = Field(default=None, gt=0)
    # Its share of a model's tokens against other keys waiting (broker/fairness.py).
    weight: float = Field(default=1.0, gt=0)

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, dict[str, object]] = Field(default_factory=dict)


class KeysFileError(Exception):
    """The keys file cannot be read: the API refuses to start."""


def load_keys(settings: Settings) -> list[NamedKey]:
    keys = [NamedKey(name=f"key-{i}", key=k) for i, k in enumerate(settings.api_keys, start=1)]
    path = settings.api_keys_file
    if path is not None:
        try:
            doc = KeysFile.model_validate(tomllib.loads(Path(path).read_text()))
            keys += [NamedKey(name=name, **fields) for name, fields in doc.keys.items()]  # type: ignore[arg-type]
        except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
            raise KeysFileError(f"LLMQ_API_KEYS_FILE={path}: {_safe(exc)}") from None
    names = [k.name for k in keys]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KeysFileError(f"API key name {dupes[0]!r} is given twice")
    return keys


def _safe(exc: Exception) -> str:
    """What is wrong with the file, without echoing any value in it (a key)."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
    return type(exc).__name__ if not isinstance(exc, OSError) else str(exc)


# KEYS: this window's request and token counters. ARGV: the limits (0: none)
# and the counters' TTL. Admits (and counts) the request, or refuses it.
_ADMIT = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if (rpm > 0 and requests >= rpm) or (tpm > 0 and tokens >= tpm) then return {0, requests, tokens} end
requests = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, requests, tokens}
"""


class RateLimiter:
    def __init__(self, r: aioredis.Redis, keys: Keys) -> None:
        self._redis = r
        self._keys = keys

    def _counters(self, key: NamedKey, window: int) -> tuple[str, str]:
        base = f"{self._keys.prefix}ratelimit:{key.name}:{window}"
        return f"{base}:requests", f"{base}:tokens"

    async def admit(self, key: NamedKey) -> dict[str, str]:
        """Count one request; its rate-limit headers. Raises a 429 over a limit."""
        now = time.time()
        window = int(now // WINDOW_S)
        requests_key, tokens_key = self._counters(key, window)
        ok, requests, tokens = await self._redis.eval(  # type: ignore[misc]
            _ADMIT, 2, requests_key, tokens_key, key.requests_per_minute or 0, key.tokens_per_minute or 0,
            2 * WINDOW_S)
        reset = f"{math.ceil((window + 1) * WINDOW_S - now)}s"
        headers: dict[str, str] = {}
        if key.requests_per_minute is not None:
            headers |= {"x-ratelimit-limit-requests": str(key.requests_per_minute),
                        "x-ratelimit-remaining-requests": str(max(key.requests_per_minute - int(requests), 0)),
                        "x-ratelimit-reset-requests": reset}
        if key.tokens_per_minute is not None:
            headers |= {"x-ratelimit-limit-tokens": str(key.tokens_per_minute),
                        "x-ratelimit-remaining-tokens": str(max(key.tokens_per_minute - int(tokens), 0)),
                        "x-ratelimit-reset-tokens": reset}
        if not ok:
            over = ("requests" if key.requests_per_minute is not None and int(requests) >= key.requests_per_minute
                    else "tokens")
            limit = key.requests_per_minute if over == "requests" else key.tokens_per_minute
            used = requests if over == "requests" else tokens
            raise APIError(429, f"Rate limit reached for API key '{key.name}' on {over} per minute: limit {limit}, "
                           f"used {used}. Retry in {reset}.", type=over, code="rate_limit_exceeded",
                           headers={**headers, "Retry-After": reset.rstrip("s")})
        return headers

    async def count_tokens(self, key: NamedKey, tokens: int) -> None:
        """A finished request's tokens, in the window it ends in."""
        if key.tokens_per_minute is None or tokens <= 0:
            return
        _, tokens_key = self._counters(key, int(time.time() // WINDOW_S))
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(tokens_key, tokens)
            pipe.expire(tokens_key, 2 * WINDOW_S)
            await pipe.execute()
