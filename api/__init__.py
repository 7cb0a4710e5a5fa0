"""The OpenAI-compatible HTTP API. It never imports torch or the worker."""
