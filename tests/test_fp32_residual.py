"""bf16 QLoRA keeps its residual stream in fp32 (as peft's prepare_model_for_kbit_training leaves it), without
upcasting the embedding table or the head: LoRA gradients land closer to the fp32 model's."""
import pytest
import torch

from lowbit.models import load_model
from lowbit.modules.lora import add_lora, prepare_for_kbit_training
from lowbit.recipes.loss import causal_lm_loss


def _grads(path, dtype, fp32_residual=True):
    model, _ = load_model(path, compute_dtype=dtype, progress=False)
    prepare_for_kbit_training(model, gradient_checkpointing=False, fp32_residual=fp32_residual)
    torch.manual_seed(0)
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = {}
    layer = pm.get_base_model().model.layers[1]
    def spy(module, args, kwargs):
        seen.setdefault("dtype", (args[0] if args else kwargs["hidden_states"]).dtype)
    layer.register_forward_pre_hook(spy, with_kwargs=True)
    causal_lm_loss(pm, ids, ids).backward()
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}, seen["dtype"], model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_residual_stream_is_fp32_and_gradients_closer(arch, tiny_model_dirs, one_thread):
    path = tiny_model_dirs(arch)
    ref, _, _ = _grads(path, "float32")
    got, dtype, model = _grads(path, "bfloat16")
    old, old_dtype, _ = _grads(path, "bfloat16", fp32_residual=False)
    assert dtype == torch.float32 and old_dtype == torch.bfloat16
    # the tables stay as stored: no fp32 copy of the embedding / head
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16

    def err(g):
        return sum((g[n].float() - ref[n]).norm() ** 2 for n in ref) ** 0.5 / sum(r.norm() ** 2 for r in ref.values()) ** 0.5
    assert err(got) < 0.8 * err(old), (err(got), err(old))
