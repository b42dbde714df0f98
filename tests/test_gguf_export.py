"""GGUF k-quant files as llama-quantize writes them: per-tensor types by llama.cpp's rules, bytes equal to
llama.cpp's own quantizer (compiled from its C source), an importance matrix from text, chat metadata."""
import gguf
import numpy as np
import pytest
import torch

from lowbit.export.formats import _hf_names, verify_gguf
from lowbit.export.gguf_writer import export_gguf
from lowbit.export.imatrix import compute_imatrix, read_imatrix
from lowbit.models.gguf_arch import GGUF_ARCHS, gguf_tensors, tensor_type_plan
from lowbit.testing import make_tiny_model

TEXT = "lowbit/testing/data/macbeth_sample.txt"


@pytest.fixture(scope="module")
def wide():
    """Rows of 256: the k-quant block size (narrower rows all fall back to legacy types)."""
    model, tok = make_tiny_model("llama", hidden=256, layers=2)
    return model.eval(), tok


def _file(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q4_0"])
def test_types_follow_llama_cpp_and_bytes_equal_its_quantizer(ftype, wide, oracle, tmp_path):
    model, tok = wide
    out = tmp_path / f"m-{ftype}.gguf"
    export_gguf(model, tok, out, ftype, progress=False)
    _, stored = _file(out)
    items = list(gguf_tensors(model, GGUF_ARCHS["llama"]))
    plan = tensor_type_plan(items, model, ftype, has_imatrix=False)
    assert {n: t.tensor_type.name for n, t in stored.items()} == plan
    for name, t in items:
        qtype = plan[name]
        if qtype in ("F32", "F16", "BF16"):
            continue
        want = oracle.quantize(t.reshape(-1, t.shape[-1]), qtype)
        assert np.array_equal(np.asarray(stored[name].data).reshape(want.shape), want), (ftype, name, qtype)
    if ftype == "Q4_K_M":  # llama.cpp's use_more_bits: with 2 layers only the last gets Q6_K attn_v / ffn_down
        assert plan["blk.1.attn_v.weight"] == plan["blk.1.ffn_down.weight"] == "Q6_K"
        assert plan["blk.0.attn_v.weight"] == plan["blk.0.attn_q.weight"] == "Q4_K"
        assert plan["output.weight"] == "Q6_K"


def test_k_quant_file_loads_in_transformers_close_to_dense(wide, tmp_path):
    model, tok = wide
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, "Q4_K_M", progress=False)
    v = verify_gguf(out, model, tok, "Q4_K_M")
    assert v["gguf_reload_vs_decoded_max_abs_logit_diff"] < 1e-3
    assert 0 < v["gguf_vs_dense_max_abs_logit_diff"] < 0.5


def test_imatrix_from_text_weighs_the_quantizer_like_llama_cpp(wide, oracle, tmp_path):
    model, tok = wide
    names = {hf: g for (g, _), hf in zip(gguf_tensors(model, "LLAMA"), _hf_names(model), strict=True)}
    imatrix = compute_imatrix(model, tok, TEXT, names, n_ctx=64, max_chunks=4, progress=False)
    assert set(imatrix) == {g for hf, g in names.items() if hf.endswith("proj.weight") or hf == "lm_head.weight"}
    assert all(v.shape == (model.config.hidden_size if "down" not in k else model.config.intermediate_size,)
               for k, v in imatrix.items())
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    export_gguf(model, tok, plain, "Q4_K_M", progress=False)
    export_gguf(model, tok, weighted, "Q4_K_M", progress=False, imatrix=imatrix)
    _, a = _file(plain)
    _, b = _file(weighted)
    name = "blk.1.attn_q.weight"
    assert not np.array_equal(a[name].data, b[name].data)
    w = dict(gguf_tensors(model, "LLAMA"))[name]
    want = oracle.quantize(w, "Q4_K", quant_weights=imatrix[name].numpy())
    assert np.array_equal(np.asarray(b[name].data).reshape(want.shape), want)


def test_read_gguf_imatrix(tmp_path):
    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([2.0], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert torch.equal(read_imatrix(path)["blk.0.attn_q.weight"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_chat_template_and_special_ids_equal_the_tokenizer(wide, tmp_path):
    model, tok = wide
    tok = tok.__class__.from_pretrained(_save(tok, tmp_path / "tok"))
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    out = tmp_path / "m.gguf"
    export_gguf(model, tok, out, "Q8_0", progress=False)
    r, _ = _file(out)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert f("tokenizer.chat_template") == tok.chat_template
    assert f("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert f("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert f("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<end_of_turn>")


def _save(tok, path):
    tok.save_pretrained(path)
    return path
