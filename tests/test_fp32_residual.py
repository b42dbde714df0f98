"""bf16 models keep their residual stream in fp32 (as peft's prepare_model_for_kbit_training leaves it), without
upcasting the embedding table or the head: LoRA gradients land closer to the fp32 model's, and a reloaded
adapter scores as the trained model did."""
import pytest
import torch

from lowbit.models import load_model
from lowbit.modules.lora import add_lora, load_adapter, prepare_for_kbit_training
from lowbit.recipes.loss import causal_lm_loss


def _lora(path, dtype, fp32_residual=True):
    model, _ = load_model(path, compute_dtype=dtype, progress=False, fp32_residual=fp32_residual)
    prepare_for_kbit_training(model, gradient_checkpointing=False, fp32_residual=fp32_residual)
    torch.manual_seed(0)
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return pm


def _grads(path, dtype, fp32_residual=True):
    pm = _lora(path, dtype, fp32_residual)
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = {}

    def spy(module, args, kwargs):
        seen.setdefault("dtype", (args[0] if args else kwargs["hidden_states"]).dtype)
    pm.get_base_model().model.layers[1].register_forward_pre_hook(spy, with_kwargs=True)
    causal_lm_loss(pm, ids, ids).backward()
    return {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}, seen["dtype"], pm


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_residual_stream_is_fp32_and_gradients_closer(arch, tiny_model_dirs, one_thread):
    path = tiny_model_dirs(arch)
    ref, _, _ = _grads(path, "float32")
    got, dtype, pm = _grads(path, "bfloat16")
    old, old_dtype, _ = _grads(path, "bfloat16", fp32_residual=False)
    assert dtype == torch.float32 and old_dtype == torch.bfloat16
    # the tables stay as stored: no fp32 copy of the embedding / head
    assert pm.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16

    def err(g):
        return sum((g[n].float() - ref[n]).norm() ** 2 for n in ref) ** 0.5 / sum(r.norm() ** 2 for r in ref.values()) ** 0.5
    assert err(got) < 0.8 * err(old), (err(got), err(old))


def test_reloaded_adapter_scores_as_trained(tiny_model_dirs, tmp_path, one_thread):
    """Training-time numerics (prepare_for_kbit_training) = a reload through load_model + load_adapter."""
    path = tiny_model_dirs("gemma3")
    pm = _lora(path, "bfloat16")
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(3, 200, (2, 32), generator=torch.Generator().manual_seed(5))
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        base, _ = load_model(path, compute_dtype="bfloat16", progress=False)
        got = load_adapter(base, tmp_path / "ad")(input_ids=ids).logits
    assert torch.equal(got, want)


def test_qat_checkpoint_reloads_with_the_residual_dtype_it_ran(tiny_model_dirs, tmp_path, one_thread):
    import lowbit.methods.qat as qat
    from lowbit.utils.modules import has_fp32_residual
    path = tiny_model_dirs("gemma3")
    model, tok = load_model(path, load_in_4bit=False, compute_dtype="bfloat16", progress=False)
    assert has_fp32_residual(model)
    converted = qat.convert(qat.prepare(model, "w4a8kv8-rot"))
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = converted(input_ids=ids).logits
        qat.save_quantized(converted, tmp_path / "q", tok)
        again = qat.load_quantized(tmp_path / "q")
        assert has_fp32_residual(again)
        assert torch.equal(again(input_ids=ids).logits, ref)
