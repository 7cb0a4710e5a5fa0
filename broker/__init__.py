"""The contract between the API and the workers: settings, Redis names, Celery
wiring, job and event schemas, the worker registry. Nothing here imports
torch, FastAPI or the model code."""

__version__ = "0.1.0"
