"""Adapters trained on lowbit's 4-bit base load in peft onto transformers+bitsandbytes NF4."""
import pytest
import torch

from lowbit.models import load_model
from lowbit.modules.lora import add_lora, load_adapter, prepare_for_kbit_training


def _train_a_few_steps(pm, ids, steps=3):
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_adapter_loads_on_bitsandbytes_base_with_same_logits(arch, tiny_model_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    ids = tok(["Fair is foul, and foul is fair: hover through the fog and filthy air."], return_tensors="pt").input_ids
    losses = _train_a_few_steps(pm, ids)
    assert losses[-1] < losses[0]
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ours = pm(input_ids=ids).logits

    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg, dtype=torch.float32)
    theirs_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    # train mode (dropout 0): bitsandbytes' eval/no_grad CPU path repacks to a bf16 kernel,
    # which would compare bitsandbytes' bf16 rounding, not the adapters
    theirs_model.train()
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids).logits
    # same bytes, same adapters; only matmul order differs between the two 4-bit kernels
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    # and back onto a fresh lowbit base
    again, _ = load_model(path, compute_dtype="float32", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(again, tmp_path / "adapter")(input_ids=ids).logits, ours,
                                   rtol=0, atol=0)
