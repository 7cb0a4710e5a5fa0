"""Benchmark for llmq: a running stack over HTTP, and the same model in-process
one request at a time (the plain decode loop FastChat's model_worker runs), so
the figure that matters is their ratio. Run as ``python -m bench``."""
