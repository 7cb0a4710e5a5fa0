"""The ``llmq`` command: thin wrappers that start the API, a worker, the
whole demo stack, and build the demo model. Heavy imports stay inside the
commands so ``llmq --help`` is instant and the API never loads torch."""
