"""Any causal LM in 4-bit: every family in `lowbit.testing.ARCHS` (dense, MoE, image-text), each tiny
and random, through load → LoRA step → peft save/reload → merge → estimator.

NF4 tolerance: the 4-bit model must equal the dense model run with the dequantized weights (tight), and
may differ from the dense model itself by at most 1.5× what Gaussian weight noise of NF4's measured
relative error (‖W − deq(Q(W))‖/‖W‖, ≈ 0.09 here) does to the same model — a bound set by NF4's error
and each family's own sensitivity (Gemma's norms amplify it ~5× more than Llama's), not a constant.
"""
import json

import pytest
import torch

from lowbit.estimate.memory import ModelShape, Setup, estimate
from lowbit.estimate.probe import decoder_layers
from lowbit.export.merge import merge
from lowbit.models import load_model
from lowbit.modules import Experts4bit, Linear4bit
from lowbit.modules.lora import add_lora, load_adapter
from lowbit.testing import ARCHS
from lowbit.testing.tiny import MOE_ARCHS


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


TEXT = "Fair is foul, and foul is fair: hover through the fog and filthy air. When shall we three meet again?"


def _ids(tok):
    return tok([TEXT], return_tensors="pt").input_ids


def _quantized(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, Experts4bit))}


def _set_dense_like(dense, quantized: dict, fn) -> None:
    """For each 4-bit layer of the lowbit model, replace the dense model's weight W by fn(W, 4-bit layer)."""
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for name, q in quantized.items():
            d = mods[name]
            for p in (q.projs if isinstance(q, Experts4bit) else ["weight"]):
                w = getattr(d, p)
                w.copy_(fn(w, q, p))


def _deq(w, q, p):
    if isinstance(q, Experts4bit):
        return q.dequantize(p, torch.float32)
    d = q.dequantize(torch.float32)
    return d.t() if getattr(q, "lowbit_conv1d", False) else d


def _nbytes(mod) -> int:
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*mod.parameters(), *mod.buffers()]}
    return sum(seen.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_4bit_within_nf4_tolerance(arch, tiny_model_dirs):
    from transformers import AutoModelForCausalLM
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    q = _quantized(model)
    assert any(isinstance(m, Experts4bit) for m in q.values()) == (arch in MOE_ARCHS)
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ratio = _nbytes(decoder_layers(model.get_decoder())) / _nbytes(decoder_layers(bf16.get_decoder()))
    assert ratio <= 0.40, ratio
    ids = _ids(tok)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    deq = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _set_dense_like(deq, q, _deq)
    noisy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    errs = []
    _set_dense_like(noisy, q, lambda w, m, p: errs.append(((_deq(w, m, p) - w).norm() / w.norm()).item()) or w)
    eps = (sum(e * e for e in errs) / len(errs)) ** 0.5
    g = torch.Generator().manual_seed(0)
    _set_dense_like(noisy, q, lambda w, m, p: w + torch.randn(w.shape, generator=g) * w.std() * eps)
    with torch.no_grad():
        got, want, ref, base = (m(input_ids=ids).logits for m in (model, deq, dense, noisy))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert 0.0 < rel(got, ref) <= 1.5 * rel(base, ref), (rel(got, ref), rel(base, ref), eps)


def _train_step(pm, ids) -> tuple[float, float]:
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(pm(input_ids=ids, labels=ids).loss.item())
    pm.eval()
    return losses[0], losses[-1]


def _save_run(pm, base_path, out):
    from lowbit.utils.hashing import model_folder_hash
    from lowbit.utils.io import write_json
    pm.save_pretrained(out / "adapter")
    write_json(out / "lowbit_run.json", {
        "format": "lowbit.run", "version": 1,
        "config": {"model": {"path": str(base_path), "quant": {"quant_type": "nf4", "blocksize": 64,
                                                                "double_quant": True, "skip_modules": ["lm_head"]}},
                   "lora": {"r": 8, "alpha": 16, "init": "zero"}},
        "base_model": {"path": str(base_path), "sha256": model_folder_hash(base_path),
                       "model_type": pm.get_base_model().config.model_type}})


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_step_adapter_reload_and_merge(arch, tiny_model_dirs, tmp_path):
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    moe = arch in MOE_ARCHS
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_parameters="all-experts" if moe else None)
    ids = _ids(tok)
    before, after = _train_step(pm, ids)
    assert after < before
    if moe:  # the experts' own adapters trained (peft target_parameters layout: one low-rank pair per expert)
        moved = [n for n, p in pm.named_parameters() if ".experts." in n and "lora_B" in n and p.abs().sum() > 0]
        assert moved
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    _save_run(pm, path, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert bool(cfg.get("target_parameters")) == moe
    again, _ = load_model(path, compute_dtype="float32", progress=False)
    reloaded = load_adapter(again, tmp_path / "run" / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, ref)
    rep = merge(tmp_path / "run", tmp_path / "merged", dtype="float32", progress=False)
    assert rep["parity_max_abs_logit_diff"] < 1e-4, rep


def _measured_layer_bytes(pm, ids) -> list[int]:
    """The estimator test's method: distinct storages autograd saves in each decoder layer (parameters,
    buffers and the layer's inputs left out), for one forward of the real model."""
    base = pm.get_base_model()
    layers = decoder_layers(base.get_decoder())
    params = {t.untyped_storage().data_ptr() for t in [*pm.parameters(), *pm.buffers()]}
    cur, saved, inputs = [None], [dict() for _ in layers], [set() for _ in layers]

    def pre(i):
        def hook(mod, args, kwargs):
            cur[0] = i
            stack = [*args, *kwargs.values()]
            while stack:  # tensors, and tuples of them (position embeddings)
                t = stack.pop()
                if torch.is_tensor(t):
                    inputs[i].add(t.untyped_storage().data_ptr())
                elif isinstance(t, (tuple, list)):
                    stack.extend(t)
        return hook

    def pack(t):
        i, ptr = cur[0], t.untyped_storage().data_ptr()
        if i is not None and ptr not in params and ptr not in inputs[i]:
            saved[i][ptr] = t.untyped_storage().nbytes()
        return t
    hs = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hs += [layer.register_forward_hook(lambda *a: cur.__setitem__(0, None)) for layer in layers]
    hs.append(base.get_decoder().get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_()))
    pm.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            base.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return [sum(d.values()) for d in saved]


@pytest.mark.parametrize("arch", ARCHS)
def test_estimator_matches_autograd(arch, tiny_model_dirs):
    from lowbit.modules.lora import prepare_for_kbit_training
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    prepare_for_kbit_training(model, False)
    moe = arch in MOE_ARCHS
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_parameters="all-experts" if moe else None)
    batch, seq = 2, 64
    ids = torch.randint(3, len(tok), (batch, seq), generator=torch.Generator().manual_seed(0))
    measured = _measured_layer_bytes(pm, ids)
    est = estimate(ModelShape.load(str(path)), Setup(seq=seq, batch=batch, compute_dtype="float32", lora_r=8,
                                                      gradient_checkpointing=False))
    assert est["sized_by"] == "meta trace"
    assert est["activations"] == pytest.approx(sum(measured), rel=0.15), (est["activations"], measured)
    assert est["per_layer_activations"] == pytest.approx(max(measured), rel=0.15)
    assert est["trainable_params"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    if moe:  # all experts resident, top-k of them active per token
        assert est["expert_params_active"] < est["expert_params_total"]
        assert est["active_params"] < est["params"]


def _random_run(path, out, arch):
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    pm = add_lora(model, r=8, alpha=16, dropout=0.0, target_parameters="all-experts" if arch in MOE_ARCHS else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    _save_run(pm, path, out)
    return tok


@pytest.mark.parametrize("arch", ARCHS)
def test_exports_load_back(arch, tiny_model_dirs, tmp_path):
    """peft (reloaded by peft, identical logits), merged (reloaded by transformers), bnb4: transformers +
    bitsandbytes loads it with the Linear layers in 4-bit and computes what lowbit's dequantized weights do;
    MoE experts stay dense there (transformers cannot express fused 3-D experts in bitsandbytes, Llama 4's
    per-expert MLPs aside) and lowbit reloads the file with them in 4-bit, as from the merged checkpoint."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from lowbit.export.bnb4bit import bnb4_reference
    from lowbit.export.formats import export_bnb4, export_peft
    tok = _random_run(tiny_model_dirs(arch), tmp_path / "run", arch)
    assert export_peft(tmp_path / "run", tmp_path / "peft")["parity_max_abs_logit_diff"] == 0.0
    merge(tmp_path / "run", tmp_path / "merged", dtype="float32", progress=False)
    rep = export_bnb4(tmp_path / "run", tmp_path / "bnb4", compute_dtype="float32", verify=False, progress=False)
    split = arch == "llama4_text"
    assert (rep["dense_experts_tensors"] > 0) == (arch in MOE_ARCHS and not split)
    ids = _ids(tok)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb4", dtype=torch.float32)
    q.train()  # bitsandbytes' eval CPU path repacks to bf16 (README); the tiny models have no dropout
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = q(input_ids=ids).logits, bnb4_reference(merged)(input_ids=ids).logits
    # experts are stored in the compute dtype; fp32 here, so only bitsandbytes' own rounding is left
    assert (got - want).abs().max().item() < 1e-3 * max(want.abs().max().item(), 1.0)
    ours, _ = load_model(tmp_path / "bnb4", compute_dtype="float32", progress=False)
    direct, _ = load_model(tmp_path / "merged", compute_dtype="float32", progress=False)
    assert any(isinstance(m, Experts4bit) for m in ours.modules()) == (arch in MOE_ARCHS)
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, direct(input_ids=ids).logits
    # byte-identical but Llama 4, whose per-expert gate/up matrices are re-fused and requantized
    assert (a - b).abs().max().item() <= (1e-2 * b.abs().max().item() if split else 0.0)
