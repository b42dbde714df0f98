"""GGUF k-quant files as llama-quantize writes them: per-tensor types by llama.cpp's rules, bytes equal to
llama.cpp's own quantizer (compiled from its C source), an importance matrix from text, chat metadata, and every
family's tensors + hyper-parameter keys equal to llama.cpp's own convert_hf_to_gguf.py output."""
import copy
import json
import subprocess
import sys
import tarfile

import gguf
import numpy as np
import pytest
import torch
from test_gguf_families import EXPECTED_ARCH, tiny

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
    model = copy.deepcopy(model)
    model.resize_token_embeddings(len(tok))  # the new token needs its embedding row (else export refuses)
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


# ---- llama.cpp's own converter (vendored in the llama-cpp-python sdist the quantizer oracle uses) ----

_HARNESS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf as c
import conversion

_get = c.get_model_class
def _patched(*a, **k):  # tensors + hyper-parameters only: our tiny tokenizer is none of its known ones
    cls = _get(*a, **k)
    for klass in cls.__mro__:
        if "set_vocab" in klass.__dict__:
            klass.set_vocab = lambda self: None
    return cls
c.get_model_class = _patched
_load = conversion.ModelBase.load_hparams
def _hparams(*a, **k):  # keys transformers 5 no longer writes that the converter still reads
    h = _load(*a, **k)
    if h.get("model_type") == "gpt_neox":
        h.setdefault("rotary_pct", (h.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if h.get("model_type") == "gpt2":
        h.setdefault("n_ctx", h.get("n_positions"))
    return h
conversion.ModelBase.load_hparams = staticmethod(_hparams)
for src, out in json.loads(sys.argv[2]):
    mtp = ["--no-mtp"] if "qwen3_5" in src else []  # Qwen3.5's converter expects an MTP head the tiny ones lack
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", "f32", *mtp, "--outfile", out]
    c.main()
"""


@pytest.fixture(scope="module")
def llama_cpp_converter():
    """Folder with llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/, from the cached sdist."""
    from lowbit.testing import ggml_oracle
    try:
        ggml_oracle.ensure_sources()
    except ggml_oracle.OracleUnavailable as e:
        pytest.skip(f"llama.cpp sources unavailable: {e}")
    sdist = sorted(ggml_oracle.cache_dir().glob("llama_cpp_python-*.tar.gz"))[-1]
    dest = ggml_oracle.cache_dir() / f"convert-{sdist.name.removesuffix('.tar.gz')}"
    if not (dest / "convert_hf_to_gguf.py").exists():
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in m.name else None
                if m.isfile() and rel and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))):
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(m).read())
    return dest


@pytest.mark.slow
def test_tensors_and_keys_equal_llama_cpps_converter(llama_cpp_converter, tmp_path):
    """Our F32 file against llama.cpp's convert_hf_to_gguf.py run on the same saved checkpoint: the same tensor
    names, byte-equal data, the same hyper-parameter keys (ours may add a few it leaves to defaults)."""
    archs = sorted(EXPECTED_ARCH)
    jobs = []
    for a in archs:
        model, tok = tiny(a)
        model.save_pretrained(tmp_path / a)
        tok.save_pretrained(tmp_path / a)
        jobs.append((str(tmp_path / a), str(tmp_path / f"ref-{a}.gguf")))
    proc = subprocess.run([sys.executable, "-c", _HARNESS, str(llama_cpp_converter), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # keys we write that llama.cpp's converter leaves to llama.cpp's defaults (same values), or derives wrongly
    # from transformers 5 configs (deepseek_v3 no longer spells out scoring_func: llama.cpp would assume softmax)
    extra_ok = {"vocab_size", "rope.freq_base", "expert_gating_func"}
    for a in archs:
        model, tok = tiny(a)
        export_gguf(model, tok, tmp_path / f"ours-{a}.gguf", "F32", progress=False)
        ours, ref = gguf.GGUFReader(str(tmp_path / f"ours-{a}.gguf")), gguf.GGUFReader(str(tmp_path / f"ref-{a}.gguf"))
        to, tr = {t.name: t for t in ours.tensors}, {t.name: t for t in ref.tensors}
        assert set(to) == set(tr), a
        for n in to:
            x, y = np.asarray(to[n].data), np.asarray(tr[n].data)
            if a.endswith("_vl") and n == "token_embd.weight":  # llama.cpp drops the image-marker rows...
                x = x[:len(y)]  # ...we keep them: the checkpoint's own embedding, lossless
            assert np.array_equal(x, y), (a, n)
        ko = {k: f.contents() for k, f in ours.fields.items() if not k.startswith(("tokenizer.", "general.", "GGUF."))}
        kr = {k: f.contents() for k, f in ref.fields.items() if not k.startswith(("tokenizer.", "general.", "GGUF."))}
        assert set(kr) <= set(ko), (a, set(kr) - set(ko))
        assert all(k.split(".", 1)[1] in extra_ok for k in set(ko) - set(kr)), (a, set(ko) - set(kr))
        for k, v in kr.items():
            assert ko[k] == pytest.approx(v), (a, k)
