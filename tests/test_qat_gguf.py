"""QAT toward GGUF file types: the fake-quant model computes with exactly what `lowbit export --format gguf` writes."""
import gguf
import pytest
import torch

import lowbit.methods.qat as qat
from lowbit.errors import ConfigError
from lowbit.export.cli import gguf_perplexity
from lowbit.export.cli import main as export_cli
from lowbit.export.formats import _hf_names, export_gguf_file, gguf_reference
from lowbit.format import ggml_quants
from lowbit.methods.qat import gguf as gq
from lowbit.methods.qat.linear import QATLinearMixin, effective_weight
from lowbit.models.gguf_arch import GGUF_ARCHS, gguf_tensors
from lowbit.models.load import quantize_model
from lowbit.modules.lora import add_lora
from lowbit.testing.tiny import make_tiny_model

TEXT = "lowbit/testing/data/macbeth_sample.txt"


def _ids(seed=1):
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        ids = _ids(10 + i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _fq_weights(model):
    """{HF weight name: the fake-quantized weight each QAT linear computes with}."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {f"{n}.weight": m.lowbit_weight_fq(effective_weight(m), out_dtype=torch.float32).detach()
            for n, m in hf.named_modules() if isinstance(m, QATLinearMixin)}


def _export_and_compare(model, tok, tmp_path, ftype, arch):
    """save_dense → export → every tensor the file holds decodes to what the fake-quant model computes with."""
    ids = _ids()
    with torch.no_grad():
        trained = model(input_ids=ids).logits.float()
    dense_dir = qat.save_dense(model, tmp_path / "dense", tok)
    out = tmp_path / f"m-{ftype}.gguf"
    # None: the type it trained for. verify=False: transformers' own GGUF reader is checked by the export tests;
    # here the file is decoded by lowbit's inverse conventions (gguf_reference) and compared tensor by tensor
    rep = export_gguf_file(dense_dir, out, gguf_type=None, progress=False, verify=False)
    assert rep["gguf_type"] == ftype
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ref, reader = gguf_reference(dense, out)
    stored = {t.name: t for t in reader.tensors}
    names = {hf: g for (g, _), hf in zip(gguf_tensors(dense, GGUF_ARCHS[dense.config.model_type]), _hf_names(dense),
                                         strict=True)}
    ref_sd = ref.state_dict()
    fq = _fq_weights(model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for hf_name, w in fq.items():
        assert torch.equal(ref_sd[hf_name], w), hf_name
        layer = hf.get_submodule(hf_name.removesuffix(".weight"))
        assert stored[names[hf_name]].tensor_type.name == layer.lowbit_weight_fq.cfg.ggml_type, hf_name
    emb = hf.get_input_embeddings().weight.float()
    assert torch.equal(ref_sd["model.embed_tokens.weight"], emb)  # the frozen embedding: what the file holds
    with torch.no_grad():
        got = ref(input_ids=ids).logits.float()
    assert (got - trained).abs().max().item() < 1e-4
    return out, dense_dir


@pytest.mark.parametrize("ftype,arch", [("Q4_K_M", "llama"), ("Q4_0", "gemma3")])
def test_full_precision_qat_exports_exactly_the_trained_codes(ftype, arch, tmp_path):
    model, tok = make_tiny_model(arch, hidden=256, layers=2)  # rows of 256: k-quant blocks (and Q5_0 fallbacks)
    qat.prepare(model, f"gguf-{ftype.lower()}")
    assert not model.get_input_embeddings().weight.requires_grad  # frozen at the file's values
    before = {k: v.clone() for k, v in _fq_weights(model).items()}
    _train(model)
    assert any(not torch.equal(before[k], v) for k, v in _fq_weights(model).items())  # the codes did move
    _export_and_compare(model, tok, tmp_path, ftype, arch)


def test_merge_aware_lora_on_nf4_base_exports_exactly(tmp_path):
    model, tok = make_tiny_model("gemma3", hidden=256, layers=2)
    quantize_model(model, compute_dtype="float32")  # fp32 compute: parity down to float noise
    model = add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    qat.prepare(model, {"gguf_file_type": "Q4_K_M"})
    _train(model, lr=2e-2)
    _export_and_compare(model, tok, tmp_path, "Q4_K_M", "gemma3")


def test_layer_types_follow_the_file_type_mix_and_fallbacks():
    model, _ = make_tiny_model("llama", hidden=128, layers=2)  # rows of 128: no Q4_K, llama.cpp falls back
    qat.prepare(model, "gguf-q4_k_m")
    types = {n.removesuffix(".lowbit_weight_fq"): q.cfg.ggml_type for n, q in model.named_modules()
             if isinstance(q, qat.FakeQuantizer)}
    narrow = {t for n, t in types.items() if model.get_submodule(n).in_features == 128}
    wide = {t for n, t in types.items() if model.get_submodule(n).in_features == 256}  # down_proj: rows of 256
    assert narrow == {"Q5_0", "Q8_0"} and wide == {"Q4_K", "Q6_K"}  # Q4_K→Q5_0, Q6_K→Q8_0 when rows are 128
    assert model.lm_head.weight.requires_grad is False  # output.weight is stored quantized too


def test_fake_quant_is_dequantize_of_llama_cpp_bytes_with_straight_through_gradient():
    w = torch.randn(64, 512, requires_grad=True)
    for t in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"):
        fq = qat.FakeQuantizer(qat.QuantizerConfig(dtype="gguf", ggml_type=t), "weight")
        y = fq(w)
        want = ggml_quants.dequantize(ggml_quants.quantize(w.detach(), t), t, w.shape)
        assert torch.equal(y.detach(), want), t
        g = torch.randn_like(w)
        (y * g).sum().backward()
        assert torch.equal(w.grad, g)  # straight-through
        w.grad = None


def test_unprepare_restores_frozen_embedding():
    model, _ = make_tiny_model("gemma3", hidden=256, layers=1)
    emb = model.get_input_embeddings().weight.detach().clone()
    qat.prepare(model, "gguf-q4_k_m")
    assert not torch.equal(model.get_input_embeddings().weight, emb)
    qat.unprepare(model)
    assert torch.equal(model.get_input_embeddings().weight, emb)


def test_other_export_type_warns_and_eval_reads_the_file_back(tmp_path, capsys):
    model, tok = make_tiny_model("llama", hidden=256, layers=1)
    qat.prepare(model, "gguf-q4_0")
    dense = qat.save_dense(model, tmp_path / "dense", tok)
    out = tmp_path / "m.gguf"
    assert export_cli(["export", str(dense), str(out), "--format", "gguf", "--gguf-type", "Q8_0", "--eval", TEXT,
                       "--seq-len", "64", "--max-blocks", "4", "--no-verify"]) == 0
    cap = capsys.readouterr()
    assert "trained with QAT for GGUF Q4_0" in cap.err and cap.err.count("warning:") == 1
    assert gguf.GGUFReader(str(out)).tensors[1].tensor_type.name == "Q8_0"
    assert "held-out perplexity of" in cap.out
    ppl = gguf_perplexity(out, TEXT, str(dense), 64, 4)
    assert f"{ppl:.3f}" in cap.out and 1 < ppl < 1e4
    assert export_cli(["eval-gguf", str(out), "--text", str(tmp_path / "none.txt")]) == 2
    assert "eval text" in capsys.readouterr().err


def test_bad_gguf_configs_fail_with_one_line():
    with pytest.raises(ConfigError, match="gguf_file_type must be one of"):
        qat.resolve({"gguf_file_type": "Q3_K_XL"})
    with pytest.raises(ConfigError, match="gguf is a weight format"):
        qat.resolve({"weight": None, "activation": {"dtype": "gguf", "granularity": "per_token"}})
    with pytest.raises(ConfigError, match="needs qat.gguf_file_type"):
        qat.resolve({"weight": {"dtype": "gguf"}})
    model, _ = make_tiny_model("llama", hidden=64, layers=1)
    with pytest.raises(ConfigError, match="do not split into Q4_K blocks"):
        qat.prepare(model, {"weight": {"dtype": "gguf", "ggml_type": "Q4_K"}})
    with pytest.raises(ConfigError, match="deploys as a .gguf file"):
        m2, _ = make_tiny_model("llama", hidden=64, layers=1)
        qat.save_quantized(qat.convert(qat.prepare(m2, "gguf-q8_0")), "/tmp/never")


def test_recipe_run_exports_the_model_it_evaluated(tmp_path, tiny_model_dirs):
    """A training run (LoRA on a 16-bit base) → `lowbit export RUN x.gguf`: the file scores the run's own
    after-training perplexity (its eval ran on the fake-quant model)."""
    from lowbit.recipes import run
    from lowbit.recipes.config import load_config
    base = tiny_model_dirs("llama")
    out = tmp_path / "run"
    cfg = load_config("configs/qlora/gemma3-270m-qat.yaml", [
        f"model.path={base}", "model.quant.compute_dtype=float32", f"train.output_dir={out}", "train.max_steps=3",
        f"data.train_files=[{TEXT}]", f"data.eval_files=[{TEXT}]", "data.max_seq_len=64", "data.max_eval_blocks=4",
        "train.batch_size=2", "eval.before=false", "train.report_to=[jsonl]", "train.gradient_checkpointing=false",
        "qat.scheme=gguf-q8_0", "train.lr=0.01"])
    metrics = run(cfg)
    assert (out / "quantized" / gq.MARKER).exists()
    f = tmp_path / "run.gguf"
    assert export_cli(["export", str(out), str(f), "--format", "gguf", "--eval", TEXT, "--seq-len", "64",
                       "--max-blocks", "4", "--no-verify"]) == 0
    assert gguf.GGUFReader(str(f)).fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q8_0
    ppl = gguf_perplexity(f, TEXT, str(base), 64, 4)
    assert abs(ppl - metrics["eval_ppl_after"]) < 1e-3 * metrics["eval_ppl_after"]
