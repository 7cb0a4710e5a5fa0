"""Logging for the API process: plain text by default, one JSON object per
line with ``LLMQ_LOG_FORMAT=json`` (python-json-logger), for uvicorn's
loggers and llmq's alike. Per-request lines carry their fields as extras
(job_id, model, worker, tokens, timings, status), which JSON output keeps as
keys."""

from __future__ import annotations

from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "format": JSON_FORMAT}
        if log_format == "json"
        else {"format": TEXT_FORMAT}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "llmq": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
