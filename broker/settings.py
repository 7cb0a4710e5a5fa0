"""Settings shared by every llmq process, read once at each entry point.

Every field can be set from the environment with the ``LLMQ_`` prefix
(``LLMQ_REDIS_URL``, ``LLMQ_MAX_QUEUE_DEPTH``...). Nothing builds a settings
object at import time: entry points build one and pass it down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.schemas import DeclaredModel

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_", extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    # Redis behind Sentinel (broker/connections.py): "host:port,host:port" and
    # the monitored primary's name; the URL then gives only the db and password.
    redis_sentinels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    redis_sentinel_master: str = "mymaster"
    key_prefix: str = Field(default="llmq:", description="prefix of every Redis key llmq owns")

    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0, description="a worker silent this long is gone")
    registry_cache_s: float = Field(default=1.0, ge=0)

    max_queue_depth: int = Field(default=256, ge=1, description="jobs waiting per model before 429")
    # Retry-After on a 429 for a full queue or a missed queue deadline: the
    # model's queue depth over its workers' drain rate (jobs/s, from their
    # heartbeats), within [retry_after_s, max_retry_after_s]; retry_after_s
    # alone while no drain rate is known.
    retry_after_s: int = Field(default=2, ge=1)
    max_retry_after_s: int = Field(default=60, ge=1)
    # How long a job may wait in its queue before it is dropped unrun (a 429
    # max_queue_time_exceeded): the default for requests without the
    # x-llmq-max-queue-time header and for keys with no default of their own
    # (api/keys.py). None: until first_event_timeout_s.
    max_queue_time_s: float | None = Field(default=None, gt=0)
    # Models that may have no live worker (scale from zero): a JSON list of
    # {"name", "kind", "context_length"} objects, or the path of a file of it.
    # Their requests wait up to wait_for_worker_s for a worker to start
    # (0: answered 503 no_live_worker at once, as for any model).
    # Fair share between API keys within a model's queue and priority step
    # (broker/fairness.py); off: first come, first served.
    fair_share: bool = True
    models: Annotated[list[DeclaredModel], NoDecode] = Field(default_factory=list)
    wait_for_worker_s: float = Field(default=0.0, ge=0)
    # Per-job keys in Redis, each with a TTL so that their count stays flat
    # under any load: a cancel mark outlives the longest a job may wait in its
    # queue (first_event_timeout_s); a claim lasts while its job runs, then
    # lingers a little for a late redelivered copy to find.
    cancel_ttl_s: int = Field(default=900, ge=1)
    claim_ttl_s: int = Field(default=3600, ge=1)
    job_key_linger_s: int = Field(default=60, ge=1)
    # How long the API waits for the first event of a job (queue time included)
    # and then for each next one, before it gives up with a 504 / error event.
    # On a warm shutdown a worker finishes running jobs for at most this long.
    drain_timeout_s: float = Field(default=60.0, ge=0)
    first_event_timeout_s: float = Field(default=600.0, gt=0)
    event_timeout_s: float = Field(default=120.0, gt=0)

    # API keys: Bearer tokens accepted on every /v1 route; none means open.
    # LLMQ_API_KEYS takes a comma-separated list.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # Named keys with limits per minute (a TOML file; api/keys.py shows its form).
    api_keys_file: Path | None = None
    # LoRA adapter affinity: an adapter's job goes first to a worker that
    # holds the adapter in a slot and has room, to any worker of its base
    # otherwise (api/jobs/lifecycle.py route, worker/intake.py). Off: any
    # worker of the base takes it, and loads it if it must.
    lora_affinity: bool = True
    # The admin key: loads and unloads LoRA adapters (api/admin.py). Unset,
    # those routes refuse every call.
    admin_key: SecretStr | None = Field(default=None, repr=False)
    # CORS for browser front ends on other origins: closed unless listed; "*" allowed.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_allow_methods: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["GET", "POST", "OPTIONS"])
    cors_allow_headers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["authorization", "content-type"]
    )
    log_format: Literal["text", "json"] = "text"
    # The Python that `llmq worker --engine vllm` runs Celery with: vLLM's own
    # virtualenv (cli/argv.py; unset, the checkout's .venv-vllm).
    vllm_python: Path | None = None
    # Request limits: bigger bodies get 413, longer conversations 400.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=1024, ge=1)
    # Files (/v1/files, api/batches/files.py): kept in Redis, so every API process serves them.
    files_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1, description="per file; over it a 413")
    files_ttl_s: int = Field(default=30 * 24 * 3600, ge=60, description="how long an uploaded file is kept")
    # Batches (/v1/batches, api/batches/routes.py). A batch is kept in Redis for its
    # completion window plus files_ttl_s; every API process's keeper advances
    # the open ones, one process per batch at a time (a lease).
    # Requests per input file, as OpenAI's limit; more fails the whole batch.
    batch_max_lines: int = Field(default=50_000, ge=1)
    # A cancelled batch waits this long for lines already running to end; the
    # lines still unfinished then go in the error file as batch_cancelled.
    batch_cancel_grace_s: float = Field(default=600.0, ge=0)
    # How long a keeper's hold on a batch lasts unrenewed: after an API
    # process dies, another takes its batches over within this.
    batch_lease_s: float = Field(default=15.0, ge=1)
    # How often each keeper looks at the open batches.
    batch_tick_s: float = Field(default=1.0, gt=0)
    # Responses (/v1/responses): a stored response and the Redis stream of
    # its events live this long (OpenAI keeps them 30 days), the stream capped
    # at this many events (a job's events: about one per token).
    responses_ttl_s: int = Field(default=30 * 24 * 3600, ge=60)
    responses_stream_max_events: int = Field(default=100_000, ge=100)

    @field_validator("api_keys", "cors_allow_origins", "cors_allow_methods", "cors_allow_headers", "redis_sentinels",
                     mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _json_or_file(cls, value: object) -> object:
        if isinstance(value, str):
            text = value if value.lstrip().startswith("[") else Path(value).read_text()
            return json.loads(text)
        return value

    def declared(self, model: str) -> DeclaredModel | None:
        return next((m for m in self.models if m.name == model), None)

    def heartbeat_ttl_ms(self) -> int:
        return int(self.heartbeat_ttl_s * 1000)
