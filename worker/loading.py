"""Loading a served model: a local directory, a Hugging Face id (from the
local cache when offline) or a ``.gguf`` file, with its tokenizer and chat
template. Every failure becomes a ``ModelLoadError`` with one readable line."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("llmq.worker.loading")

DType = Literal["auto", "float32", "float16", "bfloat16"]


class ModelLoadError(Exception):
    """A model could not be loaded; the message is meant for the operator."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    path: str
    names: tuple[str, ...] = ()
    revision: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    chat_template: str | None = None
    context_length: int | None = None
    trust_remote_code: bool = False
    load_8bit: bool = False
    load_4bit: bool = False
    num_gpus: int = 1
    max_gpu_memory: str | None = None  # per GPU, as accelerate takes it: "20GiB"

    def __post_init__(self) -> None:
        if self.load_8bit and self.load_4bit:
            raise ModelLoadError("--load-8bit and --load-4bit exclude each other")
        if self.num_gpus < 1:
            raise ModelLoadError(f"--num-gpus {self.num_gpus}: must be at least 1")

    def served_names(self) -> tuple[str, ...]:
        if self.names:
            return self.names
        base = Path(self.path).name if os.path.exists(self.path) else self.path.split("/")[-1]
        return (base.removesuffix(".gguf").lower(),)


@dataclass(kw_only=True)
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    context_length: int
    device: str
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.served_names()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.get_text_config().vocab_size)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: DType, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _source(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained reads, and the extra kwargs that says so."""
    path = Path(spec.path)
    if spec.path.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"--model-path {spec.path}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if spec.path.startswith(("/", "./", "../", "~")) and not path.exists():
        raise ModelLoadError(f"--model-path {spec.path}: no such directory")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"--model-path {spec.path}: a directory with no config.json is not a model")
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    return spec.path, kwargs


def _placement(spec: ModelSpec, device: str, dtype: Any) -> dict[str, Any]:
    """from_pretrained kwargs for quantization and for spreading over GPUs."""
    import torch

    kwargs: dict[str, Any] = {}
    if spec.load_8bit or spec.load_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401  (fail here, with a clear line, if missing)
        except ImportError as exc:
            raise ModelLoadError(f"--load-8bit/--load-4bit need bitsandbytes: {exc}") from exc
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if spec.load_8bit
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        )
    if spec.num_gpus > 1 or spec.max_gpu_memory:
        if not device.startswith("cuda"):
            raise ModelLoadError("--num-gpus and --max-gpu-memory place a model on CUDA GPUs; --device is " + device)
        available = torch.cuda.device_count()
        if spec.num_gpus > available:
            raise ModelLoadError(f"--num-gpus {spec.num_gpus}, but torch sees {available} GPU(s)")
        kwargs["device_map"] = "auto"
        if spec.max_gpu_memory:
            kwargs["max_memory"] = {i: spec.max_gpu_memory for i in range(spec.num_gpus)}
        else:
            kwargs["max_memory"] = {i: torch.cuda.get_device_properties(i).total_memory for i in range(spec.num_gpus)}
    elif "quantization_config" in kwargs:
        # Quantized weights are placed while loading; they cannot be moved after.
        kwargs["device_map"] = {"": device}
    return kwargs


def load_tokenizer(spec: ModelSpec) -> Any:
    """The model's tokenizer with its chat template (``--chat-template``
    replaces it); engines that run the model elsewhere still build prompts
    with it, so every engine renders a conversation the same way."""
    from transformers import AutoTokenizer

    source, kwargs = _source(spec)
    try:
        return _with_template(spec, AutoTokenizer.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model-path {spec.path}: {str(exc).splitlines()[0]}") from exc


def _with_template(spec: ModelSpec, tokenizer: Any) -> Any:
    if spec.chat_template:
        template = Path(spec.chat_template)
        if not template.is_file():
            raise ModelLoadError(f"--chat-template {spec.chat_template}: no such file")
        tokenizer.chat_template = template.read_text()
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"--model-path {spec.path}: the tokenizer has no chat template; pass --chat-template FILE"
        )
    return tokenizer


def load(spec: ModelSpec) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source, kwargs = _source(spec)
    placement = _placement(spec, device, dtype)
    tokenizer = load_tokenizer(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **placement)
    except OSError as exc:  # missing files, not in the local cache, no network
        raise ModelLoadError(f"--model-path {spec.path}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:  # unknown architecture, bad dtype...
        raise ModelLoadError(f"--model-path {spec.path}: {str(exc).splitlines()[0]}") from exc
    if "device_map" not in placement:
        model.to(device)
    model.eval()

    context = _attention_limits(spec, model, spec.context_length or _model_context(model))
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    quant = "8-bit" if spec.load_8bit else "4-bit" if spec.load_4bit else str(model.dtype)
    log.info("loaded %s as %s on %s (%s, %d MiB, context %d)", spec.path, ",".join(spec.served_names()), device,
             quant, model.get_memory_footprint() // 2**20, context)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, context_length=context, device=device,
                       eos_token_ids=eos_ids)


def _attention_limits(spec: ModelSpec, model: Any, context: int) -> int:
    """What llmq's paged attention (``worker/engines/transformers/attention.py``: full causal SDPA)
    can serve of this model: logit soft-capping it cannot do, so such a model
    is refused; a sliding window shorter than the context it does not apply,
    so the context is capped at the window, where the two agree."""
    cfg = model.config.get_text_config()
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ModelLoadError(f"--model-path {spec.path}: attention logit soft-capping is not supported "
                             "by llmq's engine")
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if isinstance(window, int) and 0 < window < context:
        log.warning("%s: sliding-window attention (%d tokens); serving a context of %d tokens, not %d",
                    spec.path, window, window, context)
        return window
    return context


def _model_context(model: Any) -> int:
    cfg = model.config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
