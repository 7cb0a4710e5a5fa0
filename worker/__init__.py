"""The GPU (or CPU) worker: Celery task, model loading, prompt building, the
continuous-batching engine, heartbeats. Never imported by the API."""
