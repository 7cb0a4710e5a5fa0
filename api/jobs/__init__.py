"""The one job lifecycle every surface shares: admit (live worker, queue
bound), send (Celery, queue, priority), watch (first event, the worker's
heartbeat), resubmit (one rule), release. ``lifecycle.py`` holds it; the
surfaces (``api/completions``, ``api/responses``, ``api/batches``) supply
only where a job's events go."""
