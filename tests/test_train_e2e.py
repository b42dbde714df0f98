"""The tiny model trains through `accelerate launch train.py`; bad input is one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu.yaml"]
TINY = "configs/tiny/llama-qlora.yaml"


def _run(cmd, timeout=300):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_accelerate_launch_trains_and_adapters_reload_in_peft(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    p = _run(ACCELERATE + ["train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
                           f"train.output_dir={out}"])
    assert p.returncode == 0, p.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    run = json.loads((out / "lowbit_run.json").read_text())
    assert run["metrics"]["eval_ppl_after"] < run["metrics"]["eval_ppl_before"]
    assert "held-out perplexity:" in p.stdout

    from peft import PeftModel

    from lowbit.models import load_model
    from lowbit.modules.lora import load_adapter
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    mine, _ = load_model(tiny_model_dirs("llama"), compute_dtype="float32", progress=False)
    ours = load_adapter(mine, out / "adapter")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs("llama"), dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    theirs = PeftModel.from_pretrained(base, out / "adapter")
    theirs.train()  # avoid bitsandbytes' bf16 repacked eval kernel; lora dropout is 0
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("model.path=/nonexistent/model", "model path /nonexistent/model does not exist"),
    ("data.train_files=[/nonexistent.txt]", "data file /nonexistent.txt does not exist"),
    ("model.quant.blocksize=48", "invalid model.quant.blocksize 48"),
    ("train.lerning_rate=0.1", "did you mean 'train.lr'"),
])
def test_bad_input_is_one_clear_error_line(override, message, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    p = _run([sys.executable, "train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
              f"train.output_dir={out}", override])
    assert p.returncode == 2
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_encoder_only_architecture_is_refused_in_one_line(tmp_path):
    from transformers import BertConfig
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    p = _run([sys.executable, "train.py", "--config", TINY, f"model.path={tmp_path / 'bert'}",
              f"train.output_dir={tmp_path / 'run'}"])
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "'bert' is an encoder-only" in err[0], p.stderr[-2000:]


def test_finished_run_is_not_overwritten(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"old")
    p = _run([sys.executable, "train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
              f"train.output_dir={out}"])
    assert p.returncode == 2 and "already holds a finished run" in p.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"old"


def test_missing_column_is_reported(tiny_model_dirs, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    p = _run([sys.executable, "train.py", "--config", TINY, f"model.path={tiny_model_dirs('llama')}",
              f"train.output_dir={tmp_path / 'run'}", "data.format=prompt_completion", f"data.train_files=[{f}]"])
    assert p.returncode == 2 and "d.jsonl:1: no 'prompt' field (fields: question, answer;" in p.stderr
    assert not (tmp_path / "run" / "adapter").exists()
