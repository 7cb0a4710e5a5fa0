"""LoRA adapters on the transformers engine's model (``worker/lora.py``,
``worker/engines/transformers/lora.py``) against PEFT itself, with real
adapters of the demo model (``tests/loras.py``): the same logits per row,
whatever adapters share the step, slots taken and given back least recently
used first, and adapters another base could take refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loras import PHRASES, build, foreign
from tests.procs import DEMO_MODEL_DIR
from worker.loading import ModelSpec
from worker.lora import Adapter, AdapterError, parse_option, read, scan

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file(),
                                reason=f"{DEMO_MODEL_DIR} not built (make test builds it)")

SPEC = ModelSpec(path=str(DEMO_MODEL_DIR), names=("smollm2-135m-instruct",))


@pytest.fixture(scope="module")
def adapters() -> dict[str, Path]:
    return build()


def bank_of(model, adapters: list[Adapter], slots: int):  # type: ignore[no-untyped-def]
    from worker.engines.transformers.lora import LoraBank

    bank = LoraBank(model, SPEC, slots, 16)
    for adapter in adapters:
        bank.check(adapter)
        bank.add(adapter)
    return bank


def prompt_ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])


def test_rows_of_several_adapters_in_one_forward_match_peft_alone(adapters: dict[str, Path]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    ids = torch.tensor([prompt_ids(tok, "Who are you?")])
    expected = {}
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        expected["base"] = base(input_ids=ids).logits[0]
        for name in ("alpha", "bravo"):
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32),
                                             str(adapters[name])).eval()
            expected[name] = peft(input_ids=ids).logits[0]

        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
        bank = bank_of(model, [read(n, adapters[n], SPEC, 16) for n in ("alpha", "bravo")], 2)
        slots = {"base": 0, "alpha": bank.acquire("alpha"), "bravo": bank.acquire("bravo")}
        # Three copies of the prompt side by side in one batch of the plain
        # forward, each with its own slot on every token.
        batch = ids.repeat(3, 1)
        order = ["bravo", "base", "alpha"]
        bank.arm([slots[n] for n in order for _ in range(ids.shape[1])], "cpu")
        got = model(input_ids=batch).logits
        bank.disarm()
    for i, name in enumerate(order):
        # The same products in another order (PEFT scales B's output, llmq folds the scale into B).
        assert torch.allclose(got[i], expected[name], atol=2e-3), (name, (got[i] - expected[name]).abs().max())
        assert torch.equal(got[i].argmax(-1), expected[name].argmax(-1)), name
    assert not torch.allclose(expected["alpha"], expected["base"], atol=1e-2)  # the adapters do change the answer


def test_slots_go_to_the_least_recently_used_adapter_no_run_holds(adapters: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    bank = bank_of(model, [read(n, adapters[n], SPEC, 16) for n in PHRASES], 2)
    a = bank.acquire("alpha")
    b = bank.acquire("bravo")
    assert {a, b} == {1, 2} and bank.acquire("charlie") is None  # both held by running rows
    bank.release(a)
    c = bank.acquire("charlie")
    assert c == a and bank.resident() == ["bravo", "charlie"] and bank.loads == 3  # alpha gave way
    assert bank.acquire("bravo") == b and bank.loads == 3  # resident: no load


def test_adapters_this_base_cannot_take_are_refused_with_the_reason(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engines.transformers.lora import LoraBank

    with pytest.raises(AdapterError, match="trained on 'gpt2'"):
        read("other", foreign(tmp_path / "gpt2"), SPEC, 16)
    with pytest.raises(AdapterError, match="rank 32, over --max-lora-rank 16"):
        read("wide", foreign(tmp_path / "wide", base=str(DEMO_MODEL_DIR), rank=32), SPEC, 16)
    # Named for this base, shaped for another: the shapes tell.
    lying = read("lying", foreign(tmp_path / "lying", base=str(DEMO_MODEL_DIR)), SPEC, 16)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    with pytest.raises(AdapterError, match="768x768 in the adapter, 576x576 in this base model"):
        LoraBank(model, SPEC, 1, 16).check(lying)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read("empty", tmp_path, SPEC, 16)
    assert parse_option("alpha=/x/y") == ("alpha", "/x/y")
    with pytest.raises(AdapterError.__mro__[1], match="NAME=PATH"):
        parse_option("just-a-path")


def test_adapters_come_and_go_while_runs_keep_their_slots(adapters: dict[str, Path], tmp_path: Path) -> None:
    """Served while the worker runs (--lora-dir, the API's loads): a layer is
    wrapped only once an adapter that trains it is loaded, an adapter removed
    while a run holds its slot keeps that slot until the run ends, and its
    tensors are read on first use, not when it is named."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from worker.engines.transformers.lora import LoraBank, LoraLinear

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    bank = LoraBank(model, SPEC, 1, 16)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # no adapter yet: the plain model
    for name in ("alpha", "bravo"):
        shutil.copytree(adapters[name], tmp_path / name)
    (tmp_path / "notes").mkdir()  # no adapter_config.json: not an adapter
    assert scan(tmp_path) == {"alpha": tmp_path / "alpha", "bravo": tmp_path / "bravo"}
    alpha = read("alpha", tmp_path / "alpha", SPEC, 16)
    (tmp_path / "bravo" / "adapter_model.safetensors").unlink()
    bravo = read("bravo", tmp_path / "bravo", SPEC, 16)  # named: its config only
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        bank.check(bravo)  # first use: its tensors
    bank.add(alpha)
    slot = bank.acquire("alpha")
    assert slot == 1 and sum(isinstance(m, LoraLinear) for m in model.modules()) == len(alpha.weights)
    bank.remove("alpha")
    charlie = read("charlie", adapters["charlie"], SPEC, 16)
    bank.check(charlie)
    bank.add(charlie)
    assert bank.acquire("charlie") is None  # the one slot is still held by alpha's run
    bank.release(slot)
    assert bank.acquire("charlie") == 1 and bank.resident() == ["charlie"] and "alpha" not in bank.loads_of
    with pytest.raises(AdapterError, match="name 'x/y'"):
        read("x/y", adapters["alpha"], SPEC, 16)
