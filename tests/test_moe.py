"""MoE experts in 4-bit (`Experts4bit`): the family's own expert math, bitsandbytes bytes per expert, only the
routed experts computed, LoRA on experts in peft's own format (loadable by peft on the dense model),
state dict round trip, refusal of unknown experts modules."""
import pytest
import torch

from lowbit.errors import UnsupportedModelError
from lowbit.models import load_model, quantize_model
from lowbit.modules import Experts4bit, Linear4bit
from lowbit.modules.lora import add_lora
from lowbit.modules.moe4bit import quantize_experts
from lowbit.modules.structure import experts_modules
from lowbit.testing.tiny import MOE_ARCHS, make_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _inputs(q: Experts4bit, hidden: int, n: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g, requires_grad=True)
    if q.api == "prescaled":  # Llama 4: every expert's rows, zero where the token is not routed there
        rows = torch.randn(q.num_experts, n, hidden, generator=g)
        rows[torch.arange(q.num_experts)[:, None] != torch.randint(0, q.num_experts, (n,), generator=g)] = 0
        return (rows.view(-1, hidden).requires_grad_(),)
    idx = torch.stack([torch.randperm(q.num_experts, generator=g)[:2] for _ in range(n)])
    return x, idx, torch.rand(n, 2, generator=g)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts4bit_runs_the_family_math(arch):
    """Output and input gradient equal the dense transformers module holding the dequantized weights."""
    model, _ = make_tiny_model(arch)
    name, dense = next(iter(experts_modules(model).items()))
    q = quantize_experts(dense, torch.float32)
    with torch.no_grad():
        for p in q.projs:
            getattr(dense, p).copy_(q.dequantize(p, torch.float32))
    args = _inputs(q, model.config.get_text_config().hidden_size)
    want, got = dense(*args), q(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    gw, = torch.autograd.grad(want.square().sum(), args[0])
    gg, = torch.autograd.grad(got.square().sum(), args[0])
    torch.testing.assert_close(gg, gw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # [E, out, in] and transposed [E, in, out] storage
def test_each_expert_holds_bitsandbytes_bytes(arch, quant_type):
    import bitsandbytes.functional as F
    model, _ = make_tiny_model(arch)
    dense = next(iter(experts_modules(model).values()))
    q = quantize_experts(dense, torch.float32, quant_type=quant_type)
    for p in q.projs:
        for e in range(q.num_experts):
            w = getattr(dense, p)[e].detach()
            w = w.t() if q.stored_transposed else w  # the expert's [out, in] Linear weight
            packed, state = F.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                            quant_type=quant_type)
            mine = q.quant(p, e)
            assert torch.equal(mine.codes_u8(), packed.view(torch.uint8).reshape(-1))
            assert torch.equal(mine.absmax, state.absmax) and mine.shape == tuple(w.shape)


def test_only_routed_experts_are_dequantized(monkeypatch):
    model, _ = make_tiny_model("qwen3_moe")
    q = quantize_experts(next(iter(experts_modules(model).values())), torch.float32)
    used = []
    orig = Experts4bit.quant
    monkeypatch.setattr(Experts4bit, "quant", lambda self, p, e: used.append(e) or orig(self, p, e))
    x = torch.randn(5, model.config.hidden_size)
    q(x, torch.tensor([[2, 0]] * 5), torch.full((5, 2), 0.5))
    assert sorted(set(used)) == [0, 2]


# the three layouts: [E, out, in]; transposed with biases; transposed but read by peft as [E, out, in]
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4_text"])
def test_expert_lora_loads_in_peft_on_the_dense_model(arch, tiny_model_dirs, tmp_path):
    """Our expert adapter is peft's target_parameters format: peft loads it onto transformers' dense model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    pm = add_lora(model, r=4, alpha=8, dropout=0.0, target_parameters="all-experts")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=g)
    pm.save_pretrained(tmp_path / "adapter")
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mods = dict(dense.named_modules())
    with torch.no_grad():  # the dense model with the weights our 4-bit base decodes to
        for n, m in pm.get_base_model().named_modules():
            key = n.replace(".base_layer", "")  # peft wraps each 4-bit layer (experts twice, once per parameter)
            if isinstance(m, Experts4bit):
                for p in m.projs:
                    getattr(mods[key], p).copy_(m.dequantize(p, torch.float32))
            elif isinstance(m, Linear4bit):
                mods[key].weight.copy_(m.dequantize(torch.float32))
    theirs = PeftModel.from_pretrained(dense, tmp_path / "adapter").eval()
    ids = tok(["Fair is foul, and foul is fair"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, pm.eval()(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip():
    model, _ = make_tiny_model("gpt_oss")
    quantize_model(model, compute_dtype="float32")
    sd = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.bitsandbytes__nf4" in sd
    other, _ = make_tiny_model("gpt_oss", seed=1)
    quantize_model(other, compute_dtype="float32")
    other.load_state_dict(sd)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)


def test_unknown_experts_module_is_refused_in_one_line(tmp_path):
    from torch import nn
    model, _ = make_tiny_model("mixtral")

    class OddExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in_proj = nn.Parameter(torch.zeros(4, 8, 8))
    model.model.layers[0].mlp.experts = OddExperts()
    with pytest.raises(UnsupportedModelError) as e:
        quantize_model(model)
    msg = str(e.value)
    assert "model.layers.0.mlp.experts" in msg and "OddExperts" in msg and "\n" not in msg


def test_bf16_merge_of_an_moe_reloads_the_merged_weights(tiny_model_dirs, tmp_path):
    """16-bit rounding may flip near-tied top-k choices, so the merge check falls back to exact weights."""
    from test_any_model import _random_run
    from transformers import AutoModelForCausalLM

    from lowbit.export.merge import merge
    _random_run(tiny_model_dirs("mixtral"), tmp_path / "run", "mixtral")
    rep = merge(tmp_path / "run", tmp_path / "merged", dtype="bfloat16", progress=False)
    assert rep["parity_max_abs_logit_diff"] <= rep["parity_tolerance"] or "parity_note" in rep
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert m.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
