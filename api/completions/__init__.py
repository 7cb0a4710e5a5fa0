"""OpenAI's completions surface: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings`` and ``/v1/models``; their wire models and the shaping of
a job's events into streamed chunks or one body."""
