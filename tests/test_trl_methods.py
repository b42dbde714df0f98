"""train.method sft / dpo / orpo / grpo: TRL's trainers on lowbit's 4-bit base, end to end on a tiny Llama."""
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lowbit.recipes import run
from lowbit.recipes.config import load_config
from lowbit.testing import sample_text

WORDS = sample_text().split()


def _rows(path, n, make):
    rng = random.Random(0)
    path.write_text("".join(json.dumps(make(i, rng)) + "\n" for i in range(n)))
    return path


def _preference(i, rng):
    return {"prompt": " ".join(WORDS[i * 6:i * 6 + 6]), "chosen": " ".join(WORDS[i * 6 + 6:i * 6 + 10]),
            "rejected": " ".join(rng.sample(WORDS, 4))}


def _log(out):
    return [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]


def test_sft_chat_packed_lowers_the_loss(tiny_model_dirs, tmp_path):
    data = _rows(tmp_path / "chat.jsonl", 48, lambda i, _: {"messages": [
        {"role": "user", "content": " ".join(WORDS[i * 8:i * 8 + 8])},
        {"role": "assistant", "content": " ".join(WORDS[i * 8 + 8:i * 8 + 14])}]})
    out = tmp_path / "sft"
    cfg = load_config("configs/tiny/llama-qlora.yaml", [f"model.path={tiny_model_dirs('llama')}",
                      f"train.output_dir={out}", "data.format=chat", f"data.train_files=[{data}]",
                      "data.max_seq_len=128", "data.eval_fraction=0", "train.report_to=[jsonl]", "eval.before=false",
                      "eval.after=false", "train.max_steps=10"])
    m = run(cfg)
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert m["train_examples"] < 48  # packed
    assert losses[-1] < losses[0]


def test_dpo_on_the_4bit_base_raises_the_reward_margin(tiny_model_dirs, tmp_path):
    data = _rows(tmp_path / "pref.jsonl", 32, _preference)
    out = tmp_path / "dpo"
    run(load_config("configs/tiny/llama-dpo.yaml", [f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={out}",
                                                    f"data.train_files=[{data}]"]))
    log = [r for r in _log(out) if "rewards/margins" in r]
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference (adapters off)
    margins = [r["rewards/margins"] for r in log]
    half = len(margins) // 2
    assert sum(margins[half:]) / (len(margins) - half) > max(0.0, sum(margins[:half]) / half)
    record = json.loads((out / "lowbit_run.json").read_text())
    assert record["config"]["train"]["method"] == "dpo"
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in b.items())


def test_orpo_trains_with_qat_and_an_8bit_optimizer(tiny_model_dirs, tmp_path):
    """lowbit's additions hold under a TRL trainer too: merge-aware QAT, bitsandbytes' 8-bit AdamW."""
    data = _rows(tmp_path / "pref.jsonl", 16, _preference)
    out = tmp_path / "orpo"
    m = run(load_config("configs/tiny/llama-dpo.yaml", [f"model.path={tiny_model_dirs('llama')}", "train.method=orpo",
                                                        f"train.output_dir={out}", f"data.train_files=[{data}]",
                                                        "train.max_steps=4", "qat.scheme=w4a8kv8",
                                                        "train.optimizer=adamw_8bit"]))
    assert m["train_steps"] == 4 and torch.isfinite(torch.tensor(m["train_loss"]))
    assert any("log_odds_ratio" in k for r in _log(out) for k in r)
    assert (out / "quantized").is_dir()  # the QAT deployment model, converted after training


def test_grpo_with_a_verifiable_reward(tiny_model_dirs, tmp_path):
    data = _rows(tmp_path / "prompts.jsonl", 32, lambda i, _: {"prompt": " ".join(WORDS[i * 5:i * 5 + 5])})
    out = tmp_path / "grpo"
    run(load_config("configs/tiny/llama-grpo.yaml", [f"model.path={tiny_model_dirs('llama')}",
                                                     f"train.output_dir={out}", f"data.train_files=[{data}]",
                                                     "train.max_steps=6", "grpo.beta=0.04"]))
    log = _log(out)
    rewards = [r["rewards/letter_e/mean"] for r in log if "rewards/letter_e/mean" in r]
    assert len(rewards) == 6 and all(0 <= x <= 1 for x in rewards) and len(set(rewards)) > 1
    assert all("kl" in r for r in log if "rewards/letter_e/mean" in r)  # beta > 0: the adapters-off reference ran
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in b.items())


def test_sft_on_a_moe_model_trains_expert_adapters(tiny_model_dirs, tmp_path):
    out = tmp_path / "moe"
    m = run(load_config("configs/tiny/llama-qlora.yaml", [f"model.path={tiny_model_dirs('mixtral')}",
                        f"train.output_dir={out}", "lora.target_parameters=all-experts", "lora.dropout=0",
                        "train.report_to=[jsonl]", "eval.before=false", "train.max_steps=6"]))
    losses = [r["loss"] for r in _log(out) if "loss" in r]
    assert losses[-1] < losses[0] and m["eval_ppl_after"] > 0
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("experts" in k and k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in b.items())
