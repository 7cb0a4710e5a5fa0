"""Settings shared by every llmq process, read once at each entry point.

Every field can be set from the environment with the ``LLMQ_`` prefix
(``LLMQ_REDIS_URL``, ``LLMQ_MAX_QUEUE_DEPTH``...). Nothing builds a settings
object at import time: entry points build one and pass it down.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLMQ_", extra="ignore")

    redis_url: str = DEFAULT_REDIS_URL
    key_prefix: str = Field(default="llmq:", description="prefix of every Redis key llmq owns")

    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    heartbeat_ttl_s: float = Field(default=10.0, gt=0, description="a worker silent this long is gone")
    registry_cache_s: float = Field(default=1.0, ge=0)

    max_queue_depth: int = Field(default=256, ge=1, description="jobs waiting per model before 429")
    retry_after_s: int = Field(default=2, ge=1)
    cancel_ttl_s: int = Field(default=3600, ge=1)
    claim_ttl_s: int = Field(default=3600, ge=1)
    # How long the API waits for the first event of a job (queue time included)
    # and then for each next one, before it gives up with a 504 / error event.
    first_event_timeout_s: float = Field(default=600.0, gt=0)
    event_timeout_s: float = Field(default=120.0, gt=0)

    def heartbeat_ttl_ms(self) -> int:
        return int(self.heartbeat_ttl_s * 1000)
