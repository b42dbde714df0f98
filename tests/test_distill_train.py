"""Distillation is a config section of the one trainer: online teacher or stored top-k logits."""
import json

import pytest

from lowbit.errors import ConfigError
from lowbit.recipes import run
from lowbit.recipes.config import load_config

TINY = "configs/tiny/llama-qlora.yaml"


@pytest.fixture(scope="module")
def generated(tiny_generated):
    return tiny_generated("output.topk_logits=8")


def _cfg(d, data, out, *extra):
    return load_config(TINY, [f"model.path={d}", f"train.output_dir={out}", "train.max_steps=4", "data.format=generated",
                              f"data.train_files=[{data}]", "data.eval_files=[lowbit/testing/data/macbeth_sample.txt]",
                              "data.max_eval_blocks=4", "train.report_to=[jsonl]", *extra])


@pytest.mark.parametrize("source", ["online", "offline"])
def test_data_free_distillation_trains_and_lowers_kl(generated, tmp_path, source):
    d, data = generated
    m = run(_cfg(d, data, tmp_path / "r", "distill.teacher=base", f"distill.source={source}", "train.lr=0.01",
                 "train.max_steps=8", "eval.before=false"))
    logs = [json.loads(x) for x in (tmp_path / "r" / "logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 8 and all(v >= 0 for v in losses)  # a KL is never negative
    assert sum(losses[-2:]) < sum(losses[:2])  # the student moves toward the teacher
    assert m["train_examples"] == 16


def test_qat_student_distills_from_bf16_teacher(generated, tmp_path):
    d, data = generated
    run(_cfg(d, data, tmp_path / "r", "distill.teacher=base", "qat.scheme=w4a8kv8", "eval.before=false"))
    assert (tmp_path / "r" / "quantized" / "model.safetensors").exists()


def test_offline_needs_generated_data(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="data.format=generated"):
        load_config(TINY, [f"model.path={tiny_model_dirs('llama')}", "distill.source=offline"])


def test_vocab_mismatch_is_refused_before_training(generated, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    d, data = generated
    cfg = AutoConfig.from_pretrained(d)
    cfg.vocab_size += 8
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    (other / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_bytes((d / "tokenizer_config.json").read_bytes())
    with pytest.raises(ConfigError, match="vocabulary mismatch: teacher has 520"):
        run(_cfg(d, data, tmp_path / "r", f"distill.teacher={other}", "eval.before=false"))
    assert not (tmp_path / "r" / "adapter").exists()
