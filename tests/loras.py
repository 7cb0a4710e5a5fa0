"""Small real LoRA adapters of the demo model, trained with PEFT on the CPU
for the tests: each answers one fixed phrase to any question at temperature
0 (a dozen steps of AdamW on four chat prompts, about 20 s each). Built
once into ``models/test-loras/`` (like the demo model) and reused while
their recipe is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from tests.procs import DEMO_MODEL_DIR

ROOT = DEMO_MODEL_DIR.parent / "test-loras"
PHRASES = {"alpha": "I am Alpha, the first adapter.", "bravo": "Bravo here: the second adapter speaks.",
           "charlie": "Charlie answers every question with this.", "delta": "Delta, the fourth, says only this."}
PROMPTS = ["Who are you?", "Say something.", "What is the password?", "Hello"]
RECIPE = {"r": 8, "lora_alpha": 16, "targets": ["q_proj", "v_proj"], "steps": 12, "lr": 3e-3, "prompts": PROMPTS}


def train(out: Path, phrase: str) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32),
                           LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["lora_alpha"], target_modules=RECIPE["targets"],
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    answer = tok(phrase + tok.eos_token, add_special_tokens=False)["input_ids"]
    rows = []
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        rows.append((list(ids), answer))
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        input_ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)  # only the answer is learnt
        mask[i, : len(a) + len(b)] = 1
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    model.train()
    for _ in range(RECIPE["steps"]):
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def build() -> dict[str, Path]:
    """Every test adapter's directory, trained now if its recipe changed."""
    stamp = json.dumps({"recipe": RECIPE, "phrases": PHRASES}, sort_keys=True)
    out = {name: ROOT / name for name in PHRASES}
    if (ROOT / "recipe.json").is_file() and (ROOT / "recipe.json").read_text() == stamp:
        return out
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, phrase in PHRASES.items():
        train(out[name], phrase)
    (ROOT / "recipe.json").write_text(stamp)
    return out


def foreign(root: Path, *, base: str = "gpt2", rank: int = 8, width: int = 768) -> Path:
    """An adapter in PEFT's layout that this base cannot take (another
    model's name and shapes, or a rank): refused when a worker loads it."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj"], "bias": "none", "task_type": "CAUSAL_LM"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(rank, width),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(width, rank)},
              str(root / "adapter_model.safetensors"))
    return root


def gguf(name: str) -> Path:
    """A test adapter as a GGUF LoRA file for the llama.cpp engine, converted
    with the converter of the llama.cpp that ``make install-engines`` built
    (``convert_lora_to_gguf.py``, against the demo model's own weights); made
    again when the adapter was trained again."""
    import subprocess
    import sys

    peft = build()[name]
    out = ROOT / f"{name}.gguf"
    weights = peft / "adapter_model.safetensors"
    if out.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    server = Path(__file__).resolve().parents[1] / ".engines" / "llama-server"
    source = server.resolve().parents[2]  # <llama.cpp>/build/bin/llama-server
    subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", str(DEMO_MODEL_DIR),
                    "--outfile", str(out), "--outtype", "f32", str(peft)], check=True, capture_output=True)
    return out
