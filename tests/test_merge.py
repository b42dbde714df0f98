"""`lowbit merge`: parity with the adapter model, LoftQ bases, requantization, safety checks."""
import json

import pytest
import torch

from lowbit.export.cli import main as cli
from lowbit.export.merge import BaseMismatchError, atomic_dir, merge, merge_tolerance

TEXT = "Fair is foul, and foul is fair: hover through the fog and filthy air."


def make_adapter(base_path, out, r=8, alpha=16, seed=1, loftq=False):
    """A 'trained' adapter (random non-zero B) saved like the trainer does: adapter/ + lowbit_run.json."""
    from lowbit.models import load_model
    from lowbit.modules.lora import add_lora
    from lowbit.utils.hashing import model_folder_hash as base_model_hash
    from lowbit.utils.io import write_json
    if loftq:
        from lowbit.methods.loftq import loftq_init, save_loftq_base
        pm, tok, _ = loftq_init(base_path, r=r, alpha=alpha, dropout=0.0, iters=2, compute_dtype="float32",
                                progress=False)
    else:
        model, tok = load_model(base_path, compute_dtype="float32", progress=False)
        pm = add_lora(model, r=r, alpha=alpha, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out / "adapter")
    if loftq:
        save_loftq_base(pm, out / "adapter" / "loftq_base.safetensors")
    cfg = pm.get_base_model().config
    write_json(out / "lowbit_run.json", {
        "format": "lowbit.run", "version": 1,
        "config": {"model": {"path": str(base_path), "quant": {"quant_type": "nf4", "blocksize": 64,
                                                                "double_quant": True, "skip_modules": ["lm_head"]}},
                   "lora": {"r": r, "alpha": alpha, "init": "loftq" if loftq else "zero"}},
        "base_model": {"path": str(base_path), "sha256": base_model_hash(base_path), "model_type": cfg.model_type}})
    pm.eval()
    return pm, tok


@pytest.fixture(scope="module")
def llama_run(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_llama")
    pm, tok = make_adapter(tiny_model_dirs("llama"), out)
    ids = tok([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    return out, ids, ref


def _reload_logits(path, ids):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_parity_with_adapter_model(arch, dtype, tiny_model_dirs, tmp_path):
    pm, tok = make_adapter(tiny_model_dirs(arch), tmp_path / "run")
    ids = tok([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    rep = merge(tmp_path / "run", tmp_path / "merged", dtype=dtype, progress=False)
    got = _reload_logits(tmp_path / "merged", ids)
    diff = (got - ref).abs().max().item()
    tol = merge_tolerance(getattr(torch, dtype), ref)
    assert diff <= tol and rep["parity_max_abs_logit_diff"] <= rep["parity_tolerance"]
    if dtype == "float32":
        assert diff < 1e-4
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg and "lowbit_quantization" not in cfg
    # the merge used the adapters: without them the logits are far off
    from lowbit.models import load_model
    base, _ = load_model(tiny_model_dirs(arch), compute_dtype="float32", progress=False)
    with torch.no_grad():
        assert (base(input_ids=ids).logits - got).abs().max() > 10 * diff


def test_merge_uses_the_saved_loftq_base(tiny_model_dirs, tmp_path):
    pm, tok = make_adapter(tiny_model_dirs("llama"), tmp_path / "run", alpha=32, loftq=True)
    ids = tok([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    rep = merge(tmp_path / "run", tmp_path / "merged", dtype="float32", progress=False)
    assert rep["loftq_base"].endswith("loftq_base.safetensors")
    assert (_reload_logits(tmp_path / "merged", ids) - ref).abs().max() < 1e-4
    # merging onto quantize(W) instead of the LoftQ base would be wrong
    (tmp_path / "run" / "adapter" / "loftq_base.safetensors").unlink()
    merge(tmp_path / "run", tmp_path / "wrong", dtype="float32", verify=False, progress=False)
    assert (_reload_logits(tmp_path / "wrong", ids) - ref).abs().max() > 1e-3


def test_requantize_to_bnb_nf4_loads_in_transformers(llama_run, tmp_path, capsys):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    run, ids, ref = llama_run
    assert cli(["merge", str(run), str(tmp_path / "nf4"), "--requantize", "nf4"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 0.0 < rep["mean_rel_error"] < 0.15 and rep["layers"] == 14
    assert rep["bnb_reload_vs_lowbit_deq_max_abs_logit_diff"] < 0.1 * rep["bnb_vs_dense_max_abs_logit_diff"]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    cfg = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"


def test_requantizing_weights_already_on_the_nf4_grid_adds_no_error(tiny_model_dirs):
    """What merge-aware QAT produces: merged weights that are NF4 values already → requantization is lossless."""
    from transformers import AutoModelForCausalLM

    from lowbit.export.bnb4bit import bnb4_reference, bnb4_state_dict
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dirs("llama"), dtype=torch.float32)
    on_grid = bnb4_reference(dense)  # NF4 + double quant, as training used
    _, exact = bnb4_state_dict(on_grid, double_quant=False)
    assert max(e["rel_error"] for e in exact) < 1e-6
    # re-double-quantizing the absmax shifts its 8-bit codes (new offset): small, but not zero
    _, dq = bnb4_state_dict(on_grid, double_quant=True)
    _, off_grid = bnb4_state_dict(dense)
    assert max(e["rel_error"] for e in dq) < 0.05 * min(e["rel_error"] for e in off_grid)


def test_refuses_to_overwrite_without_flag(llama_run, tmp_path, capsys):
    run, _, _ = llama_run
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["merge", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "mine"
    assert cli(["merge", str(run), str(out), "--overwrite", "--no-verify"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_crash_mid_write_leaves_nothing_under_the_final_name(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # replacing an existing output: a crash keeps the old one intact
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("killed")
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_merge_crash_from_save_leaves_no_output(llama_run, tmp_path, monkeypatch):
    import transformers
    run, _, _ = llama_run

    def boom(self, *a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError):
        merge(run, tmp_path / "merged", verify=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_base_of_another_architecture(llama_run, tiny_model_dirs, tmp_path, capsys):
    run, _, _ = llama_run
    with pytest.raises(BaseMismatchError, match="--base"):
        merge(run, tmp_path / "m", base=tiny_model_dirs("gemma3"), progress=False)
    assert cli(["merge", str(run), str(tmp_path / "m"), "--base", str(tiny_model_dirs("qwen2"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "qwen2" in err[-1]
    assert not (tmp_path / "m").exists()


def test_refuses_a_base_whose_hash_differs(llama_run, tiny_model_dirs, tmp_path):
    """Same architecture and shapes, different checkpoint: caught by the base hash from lowbit_run.json."""
    import shutil
    run, _, _ = llama_run
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dirs("llama"), other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseMismatchError, match="does not match"):
        merge(run, tmp_path / "m", base=other, progress=False)


def test_refuses_shape_mismatch_without_run_file(llama_run, tmp_path):
    """A bare peft adapter (no lowbit_run.json) on a base with other shapes is refused before loading."""
    import shutil

    from lowbit.testing import save_tiny_model
    run, _, _ = llama_run
    shutil.copytree(run / "adapter", tmp_path / "bare")
    wide = save_tiny_model(tmp_path / "wide", "llama", hidden=128)
    with pytest.raises(BaseMismatchError, match="shape"):
        merge(tmp_path / "bare", tmp_path / "m", base=wide, progress=False)
