"""`lowbit estimate`: the per-layer activation count matches what autograd really keeps for a lowbit
decoder layer; sharding divides what it should; QLoRA's published 65B-on-48GB claim holds; CLI."""
import json

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.estimate.memory import ModelShape, Setup, estimate, layer_activation_bytes


def _saved_bytes(fn, exclude_ptrs) -> int:
    """Bytes of distinct storages autograd saves for backward while fn() runs, minus parameters/inputs."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("arch, dropout", [("llama", 0.0), ("qwen3", 0.1)])  # qwen3: q/k norms; dropout: copies
def test_layer_activations_match_autograd(arch, dropout, tiny_model_dirs):
    from lowbit.models import load_model
    from lowbit.modules.lora import add_lora, prepare_for_kbit_training
    model, _ = load_model(tiny_model_dirs(arch), compute_dtype="float32", progress=False)
    prepare_for_kbit_training(model, False)
    model = add_lora(model, r=8, alpha=16, dropout=dropout, target_modules="all-linear")
    model.train()
    base = model.get_base_model().model
    layer = base.layers[0]
    batch, seq = 2, 128
    h = torch.randn(batch, seq, base.config.hidden_size, requires_grad=True)
    pos = torch.arange(seq)[None].expand(batch, -1)
    pe = base.rotary_emb(h, pos)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), h, *pe]}
    measured = _saved_bytes(lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe),
                            exclude)
    shape = ModelShape.from_config(model.get_base_model().config.to_dict())
    est = layer_activation_bytes(shape, Setup(seq=seq, batch=batch, compute_dtype="float32", lora_r=8,
                                              lora_dropout=dropout))
    assert est == pytest.approx(measured, rel=0.10), (est, measured)


def _shape():
    return ModelShape.load("llama-7b")


def test_sharding_divides_what_each_stage_shards():
    one = estimate(_shape(), Setup(method="full", world_size=1))
    z = {st: estimate(_shape(), Setup(method="full", world_size=8, zero_stage=st)) for st in (0, 1, 2, 3)}
    assert z[0]["optimizer"] == one["optimizer"] and z[0]["weights"] == one["weights"]
    assert z[1]["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=1e-6)
    assert z[1]["gradients"] == one["gradients"]
    assert z[2]["gradients"] == pytest.approx(one["gradients"] / 8, rel=1e-6)
    assert z[2]["weights"] == one["weights"]
    assert z[3]["weights"] == pytest.approx(one["weights"] / 8, rel=1e-6)
    off = estimate(_shape(), Setup(method="full", world_size=8, zero_stage=3, offload="optimizer+params"))
    assert off["optimizer"] == 0 and off["weights"] == 0 and off["host_offload"] > 0


def test_method_ordering_and_checkpointing():
    s = _shape()
    q, lo, full = (estimate(s, Setup(method=m))["total"] for m in ("qlora", "lora", "full"))
    assert q < lo < full
    assert estimate(s, Setup(gradient_checkpointing=False))["activations"] > \
        4 * estimate(s, Setup(gradient_checkpointing=True))["activations"]


def test_qlora_paper_65b_fits_one_48gb_gpu():
    """QLoRA (Dettmers et al. 2023): LLaMA-65B, NF4 + double quant, LoRA r=64 on every linear layer,
    paged AdamW, gradient checkpointing, batch 1, fine-tunes on one 48 GB GPU."""
    r = estimate(ModelShape.load("llama-65b"), Setup(seq=512, batch=1, lora_r=64, optimizer="paged_adamw_32bit",
                                                      adapter_dtype="bfloat16", runtime_bytes=1 << 30))
    assert 32 * 2**30 < r["weights"] < 34 * 2**30  # 65B x (4 bits + double-quantized absmax) ~ 32.1 GiB
    assert r["total"] < 48e9
    full16 = estimate(ModelShape.load("llama-65b"), Setup(method="full", optimizer="adamw_torch"))
    assert full16["total"] > 780e9  # the paper's ">780 GB" for 16-bit full fine-tuning


def test_cli_prints_breakdown_and_json(capsys):
    assert main(["estimate", "--model", "llama-65b", "--lora-r", "64", "--optimizer", "paged_adamw_8bit"]) == 0
    text = capsys.readouterr().out
    for part in ("weights", "adapters", "gradients", "optimizer", "activations", "peak"):
        assert part in text
    assert main(["estimate", "--model", "llama-7b", "--method", "full", "--world-size", "4", "--zero-stage", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    resident = sum(out[k] for k in ("weights", "adapters", "gradients", "optimizer", "runtime"))
    phase = {"loss": out["activations"] + out["logits"], "backward": out["activations"] + out["backward"],
             "step": out["step"]}
    assert out["total"] == resident + max(phase.values()) and phase[out["peak_phase"]] == max(phase.values())


def test_cli_reads_a_model_folder(tiny_model_dirs, capsys):
    assert main(["estimate", "--model", str(tiny_model_dirs("llama")), "--seq", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] > 0


def test_cli_bad_model_is_one_clear_error(capsys):
    assert main(["estimate", "--model", "nope-13b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'nope-13b' is neither a preset") and "llama-65b" in err


def test_bad_setup_is_refused():
    with pytest.raises(ConfigError, match="zero_stage 5"):
        estimate(_shape(), Setup(zero_stage=5))


def test_moe_estimate_counts_all_experts_resident_and_top_k_active(capsys):
    """Mixtral 8x7B: 46.7B parameters, 12.9B active per token (Mistral AI's published figures)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # meta tensors: no compute, only op dispatch
    try:
        assert main(["estimate", "--model", "mixtral-8x7b", "--seq", "64", "--lora-dropout", "0", "--json"]) == 0
    finally:
        torch.set_num_threads(n)
    out = json.loads(capsys.readouterr().out)
    assert out["sized_by"] == "meta trace"
    assert out["params"] == pytest.approx(46.7e9, rel=0.01) and out["active_params"] == pytest.approx(12.9e9, rel=0.01)
    # the 4-bit weights hold every expert; LoRA (peft target_parameters) trains a pair per expert
    assert out["weights"] > 0.5 * 45e9 * 0.5 and out["expert_params_total"] == 4 * out["expert_params_active"]


def test_cli_prints_active_and_total_for_an_moe_folder(tiny_model_dirs, capsys):
    assert main(["estimate", "--model", str(tiny_model_dirs("qwen3_moe")), "--seq", "64", "--lora-dropout", "0"]) == 0
    text = capsys.readouterr().out
    assert "active per token" in text and "all resident" in text
