"""The llama.cpp engine, for GGUF files: a ``llama-server`` child process the
worker owns, one parallel slot per batch row.

llama.cpp batches the slots' tokens into one decode per step, keeps each
slot's prompt cache, samples, detokenizes and applies stop strings; this
module maps each choice of a job onto one streamed request to its native
``/completion`` endpoint (prompt as token ids, built by the runtime with the
model's own tokenizer and chat template, read from the GGUF), and the
server's stream onto ``Update`` records. Every sampler that llmq does not
expose is set to its neutral value, so llama.cpp's defaults (top-k 40,
min-p 0.05, ...) never change an answer behind the client's back.

LoRA adapters (``--lora NAME=FILE.gguf``, converted from PEFT with
llama.cpp's ``convert_lora_to_gguf.py``) are loaded by the server at start
at scale 0; every request sets each adapter's scale, 1 for its own.
One the base cannot take stops the server, and so the worker, at start.

The worker starts the server, waits until it is healthy, and stops it with
itself; on Linux the server also dies with the worker (``PR_SET_PDEATHSIG``)
so a killed worker leaves no orphan. If the server exits on its own,
``healthy()`` says so and the runtime ends the worker like a crash.

Each choice's stream is a task on the loop of ``worker/engines/loop.py``.
The engine's options (``--llama-server``, also read from
``LLMQ_LLAMA_SERVER``, and ``--n-gpu-layers``) and its declaration
(``ENGINE``) are here too.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import click
import httpx

from broker.schemas import FinishReason, Job, TokenLogprob
from worker.engines.loop import LoopEngine, Request
from worker.engines.protocol import Refused, Update
from worker.engines.registry import EngineKind, EngineOptions
from worker.engines.sse_client import post_events
from worker.grammar import JSON_OBJECT, check_spec, spec_of
from worker.loading import ModelLoadError, ModelSpec, load_tokenizer
from worker.publish import Publisher
from worker.toolcalls import format_for

log = logging.getLogger("llmq.worker.engines.llamacpp")

DEFAULT_BINARY = Path(__file__).resolve().parents[2] / ".engines" / "llama-server"  # scripts/install-llamacpp.sh
STARTUP_TIMEOUT_S = 300.0
# llama.cpp's stop types; "none" means it ended for another reason (aborted).
FINISH: dict[str, FinishReason] = {"eos": "stop", "word": "stop", "limit": "length"}


@dataclass(frozen=True, kw_only=True)
class LlamaCppOptions(EngineOptions):
    llama_server: str | None = None  # the binary (--llama-server or LLMQ_LLAMA_SERVER); None: DEFAULT_BINARY
    n_gpu_layers: int | None = None

    @classmethod
    def read(cls, opts: Mapping[str, Any]) -> Self:
        return cls(**cls.common(opts), llama_server=opts.get("llama_server"), n_gpu_layers=opts.get("n_gpu_layers"))


OPTIONS = [
    click.Option(["--llama-server"], default=None, envvar="LLMQ_LLAMA_SERVER",
                 help="llama.cpp: the llama-server binary (default .engines/llama-server, or LLMQ_LLAMA_SERVER)"),
    click.Option(["--n-gpu-layers"], type=int, default=None, help="llama.cpp: layers offloaded to the GPU"),
]


def binary(options: LlamaCppOptions) -> Path:
    path = Path(options.llama_server or DEFAULT_BINARY)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ModelLoadError(f"--engine llama.cpp: no llama-server at {path}; build it with "
                             "scripts/install-llamacpp.sh (make install does) or pass --llama-server PATH")
    return path


def adapter_files(spec: ModelSpec, options: LlamaCppOptions) -> dict[str, Path]:
    """``--lora NAME=PATH``: GGUF LoRA files, in the order llama-server gets
    them (its adapter ids are their positions)."""
    adapters: dict[str, Path] = {}
    for name, path in options.loras:
        file = Path(path)
        if name in spec.served_names() or name in adapters:
            raise ModelLoadError(f"--lora {name}={path}: the name {name!r} is served already")
        if file.is_dir():
            raise ModelLoadError(f"--lora {name}={path}: llama.cpp takes GGUF LoRA files, not a PEFT directory; "
                                 "convert it with llama.cpp's convert_lora_to_gguf.py --base <the base's Hugging "
                                 f"Face directory> --outfile {name}.gguf {path}")
        if not file.is_file() or file.suffix != ".gguf":
            raise ModelLoadError(f"--lora {name}={path}: no GGUF LoRA file there")
        if "," in path or ":" in path:  # llama-server's --lora-scaled takes FILE:SCALE,FILE:SCALE
            raise ModelLoadError(f"--lora {name}={path}: llama-server cannot take a path with ',' or ':'")
        adapters[name] = file
    return adapters


def server_argv(exe: Path, spec: ModelSpec, options: LlamaCppOptions, socket_path: Path,
                adapters: Mapping[str, Path] | None = None) -> list[str]:
    """One slot per batch row; the KV cache (``-c``) is shared by the slots.
    The server listens on a UNIX socket only the worker knows: a token
    crosses it with less kernel work than over TCP, on both sides, and
    nothing else can reach the server. LoRA adapters are loaded at scale 0
    (the base); a request names the one it runs with (``request_body``)."""
    slots = options.max_batch_size
    argv = [str(exe), "-m", spec.path, "--host", str(socket_path), "--alias", spec.served_names()[0],
            "-np", str(slots), "-c", str(options.kv_cache_tokens or slots * 2048),
            "-t", str(os.cpu_count() or 1), "--no-webui"]
    if options.n_gpu_layers is not None:
        argv += ["-ngl", str(options.n_gpu_layers)]
    if adapters:
        argv += ["--lora-scaled", ",".join(f"{path}:0" for path in adapters.values())]
    return argv


def request_body(job: Job, index: int, prompt_ids: list[int], max_tokens: int,
                 adapters: int = 0, adapter_id: int | None = None) -> dict[str, Any]:
    """One choice as a ``/completion`` request, every llmq option mapped. With
    ``adapters`` LoRA adapters loaded, every request sets each one's scale:
    1 for its own adapter, 0 for the others (a base request: all 0), since a
    slot keeps the scales of the request it ran last when a request omits
    them."""
    s = job.sampling
    # Greedy: top-k 1 picks the same token (penalties and logit_bias come
    # before top-k in llama.cpp's chain), and spares every later sampler a
    # pass over the whole vocabulary: llama-server samples its slots one
    # after another on one thread, so at 16 slots that pass cost ~8 ms a
    # step. Logprobs come from the raw logits, not from the candidates.
    top_k = 1 if s.temperature == 0 else max(s.top_k, 0)
    body: dict[str, Any] = {
        "prompt": prompt_ids, "n_predict": max_tokens, "stream": True, "cache_prompt": True,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": top_k,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        # neutral values for the samplers llmq does not expose (llama.cpp's defaults are not neutral)
        "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0, "top_n_sigma": -1.0, "xtc_probability": 0.0,
        "dry_multiplier": 0.0, "mirostat": 0,
        "stop": job.stop,
    }
    if s.seed is not None:
        body["seed"] = s.seed + index
    if s.logit_bias:
        body["logit_bias"] = [[int(t), float(b)] for t, b in s.logit_bias.items()]
    if s.logprobs is not None:
        body["n_probs"] = max(s.logprobs, 1)  # 0 would send no probabilities at all; the top list is cut to k
    if job.constraint is not None and job.constraint.kind == "json":  # check() refused every other grammar
        body["json_schema"] = job.constraint.json_schema or JSON_OBJECT
    if adapters:
        body["lora"] = [{"id": i, "scale": 1.0 if i == adapter_id else 0.0} for i in range(adapters)]
    return body


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the worker dies (Linux)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class LlamaCppEngine(LoopEngine):
    kind = "llama.cpp"
    PER_CHOICE = True  # a slot, and a request, per choice

    def __init__(self, spec: ModelSpec, options: LlamaCppOptions, publisher: Publisher) -> None:
        if not spec.path.endswith(".gguf") or not Path(spec.path).is_file():
            raise ModelLoadError(f"--engine llama.cpp serves .gguf files; --model-path {spec.path} is not one")
        if spec.load_8bit or spec.load_4bit:
            raise ModelLoadError("--load-8bit/--load-4bit are for --engine transformers; a GGUF file carries its "
                                 "own quantization")
        exe = binary(options)
        self.adapters = adapter_files(spec, options)  # --lora: served as model names, ids by position
        self._adapter_ids = {name: i for i, name in enumerate(self.adapters)}
        self.tokenizer = load_tokenizer(spec)
        self._dir = Path(tempfile.mkdtemp(prefix=f"llmq-llama-server-{os.getpid()}-"))
        self.socket_path = self._dir / "server.sock"  # llama-server takes a --host ending in .sock as a UNIX socket
        self.log_path = self._dir / "server.log"
        argv = server_argv(exe, spec, options, self.socket_path, self.adapters)
        log.info("starting %s (log %s)", " ".join(argv), self.log_path)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "LD_LIBRARY_PATH": str(Path(os.path.realpath(exe)).parent)},
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        meta = self._wait_ready()
        self.context_length = min(int(meta["n_ctx"]), spec.context_length or int(meta["n_ctx"]))
        self.vocab_size = int(meta["n_vocab"])
        self.device = "cuda" if options.n_gpu_layers else "cpu"
        self._streaming: set[str] = set()  # request ids past their prompt: a token from each every step
        super().__init__(spec.served_names(), format_for(self.tokenizer, options.tool_call_parser), publisher,
                         sources=lambda: len(self._streaming), stream_interval=options.stream_interval)
        log.info("llama.cpp engine for %s: pid %d, %d slots of %d tokens", ",".join(self.names), self.proc.pid,
                 options.max_batch_size, self.context_length)

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://localhost",
                          timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ModelLoadError(f"llama-server exited with code {self.proc.returncode} while loading: "
                                         f"{self._log_tail()}")
                try:
                    if http.get("/health").status_code == 200:
                        return dict(http.get("/v1/models").json()["data"][0]["meta"])
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.proc.kill()
        raise ModelLoadError(f"llama-server not ready after {STARTUP_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------ control

    def shut_down(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)  # its socket and log (a dead server's tail is logged already)

    def healthy(self) -> bool:
        code = self.proc.poll()
        if code is not None and not self._stopping.is_set():
            log.error("llama-server (pid %d) exited with code %s: %s", self.proc.pid, code, self._log_tail())
        return code is None or self._stopping.is_set()

    def check(self, job: Job) -> None:
        """llama.cpp honours every sampling option llmq takes (logprobs up to
        20, as llmq caps them). Of the grammars it takes JSON schemas, which
        it turns into its own grammar; regexes, EBNF, choices and tool calls
        (xgrammar's, which llama-server does not run) are refused."""
        grammar = spec_of(job, self.tool_format)
        if grammar is None:
            return
        if grammar.kind != "json":
            what = "tool calls" if grammar.kind == "structural_tag" else f"'{grammar.kind}' structured outputs"
            raise Refused(f"'{grammar.param}': {what} are not supported by this model's engine (llama.cpp); "
                          "JSON schemas are. Serve the model with --engine transformers or vllm for them.",
                          grammar.param)
        check_spec(grammar)

    # --------------------------------------------------------- loop thread

    async def generate(self, request: Request) -> None:
        """One choice as one streamed request; cancelling this task closes
        the stream, which makes llama.cpp free the slot."""
        (choice,) = request.choices
        body = request_body(request.job, choice.index, request.prompt_ids, request.max_tokens,
                            len(self._adapter_ids), self._adapter_ids.get(request.job.model))
        k = choice.job.sampling.logprobs
        counted = 0

        def on_event(data: bytes) -> bool:
            """One message of llama-server's stream; True at its last."""
            nonlocal counted
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(f"llama-server: {msg['error']}")
            self.tick()
            if msg.get("stop"):
                finish = FINISH.get(msg.get("stop_type", ""))
                if finish is None:
                    raise RuntimeError(f"llama-server ended the stream ({msg.get('stop_type')})")
                self.put([Update(choice, text=msg.get("content", ""), finish=finish,
                                 tokens=max(int(msg.get("tokens_predicted", counted)) - counted, 0))])
                return True
            tokens = len(msg.get("tokens") or ())
            if tokens or msg.get("content"):  # not the stream's opening message or a progress report
                if not counted:
                    self._streaming.add(request.id)
                counted += tokens
                self.put([Update(choice, text=msg.get("content", ""), tokens=tokens,
                                 logprobs=_logprobs(msg.get("completion_probabilities"), k))])
            return False

        try:
            # A connection per choice, closed at its end: llama-server now and
            # then drops a kept-alive connection after a streamed answer, and
            # a new local connection costs well under a millisecond.
            await post_events(str(self.socket_path), "/completion", json.dumps(body).encode(), on_event)
        finally:
            self._streaming.discard(request.id)


def _logprobs(entries: Any, k: int | None) -> list[TokenLogprob] | None:
    """llama.cpp's ``completion_probabilities`` (raw distribution, as llmq's
    own engine reports) as llmq's records, the top list cut to ``k``."""
    if k is None or not entries:
        return None
    return [TokenLogprob(token=e["token"], logprob=float(e["logprob"]),
                         top=[(t["token"], float(t["logprob"])) for t in e.get("top_logprobs", [])[:k]])
            for e in entries]


ENGINE = EngineKind(name="llama.cpp", engine="worker.engines.llamacpp:LlamaCppEngine", summary="llama.cpp (GGUF)",
                    options_type=LlamaCppOptions, options=OPTIONS, loras="start")
