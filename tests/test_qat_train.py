"""QAT as a config section of the one trainer: trains, saves the deployment model, reloads it exactly."""
import json

import pytest
import torch

import lowbit.methods.qat as qat
from lowbit.errors import ConfigError
from lowbit.recipes import run
from lowbit.recipes.config import load_config

TINY = "configs/tiny/llama-qlora.yaml"


def _cfg(model_dir, out, *extra):
    return load_config(TINY, [f"model.path={model_dir}", f"train.output_dir={out}", "train.max_steps=6",
                              "train.report_to=[jsonl]", "eval.before=false", *extra])


def _probe(tok):
    return tok(["Fair is foul, and foul is fair: hover through the fog and filthy air."] * 2,
               return_tensors="pt").input_ids


def test_qat_nf4_on_nf4_base_saves_the_model_it_trained(tiny_model_dirs, tmp_path):
    from lowbit.models import load_model
    from lowbit.modules.lora import load_adapter
    d = tiny_model_dirs("llama")
    m = run(_cfg(d, tmp_path / "r", "qat.scheme=nf4", "model.quant.compute_dtype=bfloat16"))
    assert m["train_steps"] == 6 and m["eval_ppl_after"] > 1
    saved = qat.load_quantized(tmp_path / "r" / "quantized")
    # the trained model again: 4-bit base + adapter + the same fake quant
    base, tok = load_model(d, compute_dtype="bfloat16", progress=False)
    trained = qat.prepare(load_adapter(base, tmp_path / "r" / "adapter"), "nf4")
    ids = _probe(tok)
    assert ids.numel() > 16  # the 4-bit matmul's dequantize path (GEMV for <= 16 rows rounds differently)
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, trained(ids).logits)
    run_json = json.loads((tmp_path / "r" / "lowbit_run.json").read_text())
    assert run_json["config"]["qat"]["scheme"] == "nf4"


def test_qat_w4a8kv8_on_bf16_base_with_start_step(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs("llama")
    run(_cfg(d, tmp_path / "r", "qat.scheme=configs/qat/w4a8kv8.yaml", "qat.start_step=3",
             "model.quant.load_in_4bit=false"))
    saved = qat.load_quantized(tmp_path / "r" / "quantized")
    kinds = {type(m).__name__ for m in saved.modules()}
    assert "QuantizedLinear" in kinds
    assert saved.lowbit_qat_config.weight.start_step == 3
    losses = [json.loads(x) for x in (tmp_path / "r" / "logs.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in losses)


def test_qat_with_lora_dropout_is_refused_before_work(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="lora.dropout: 0"):
        _cfg(tiny_model_dirs("llama"), tmp_path / "r", "qat.scheme=w4a8kv8", "lora.dropout=0.1")
    with pytest.raises(ConfigError, match="did you mean 'w4a8kv8'"):
        _cfg(tiny_model_dirs("llama"), tmp_path / "r", "qat.scheme=w4a8kv9")
    assert not (tmp_path / "r").exists()
