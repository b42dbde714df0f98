"""The data-free QAT recipe end to end on a tiny model: generate → distill → convert → evaluate."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_llm_qat_tiny_end_to_end(tiny_model_dirs, tmp_path):
    d = tiny_model_dirs("llama")
    out = tmp_path / "student"
    p = subprocess.run(
        [sys.executable, "scripts/run_llm_qat.py", "--generate", "configs/llm_qat/generate-gemma3-270m.yaml",
         "--distill", "configs/llm_qat/distill-gemma3-270m-w4a8kv8.yaml",
         "--gen", f"teacher.path={d}", "teacher.dtype=float32", f"output.dir={tmp_path / 'data'}",
         "generate.num_sequences=12", "generate.batch_size=6", "generate.max_len=20", "output.shard_size=6",
         "output.topk_logits=0", "output.progress=false",
         "--train", f"model.path={d}", f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=4",
         "data.eval_files=[lowbit/testing/data/macbeth_sample.txt]", "data.max_seq_len=32", "data.max_eval_blocks=4",
         "train.report_to=[jsonl]", "train.gradient_checkpointing=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "llm_qat_report.json").read_text())
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert sum(s["n_seqs"] for s in manifest["shards"]) == 12 and manifest["complete"]
    # a random tiny model is near-uniform: the numbers are only checked to be real perplexities
    assert all(1 < rep[k] < 1e4 for k in ("teacher_ppl", "ptq_ppl", "student_ppl"))
    assert rep["train"]["train_steps"] == 3 and "gap_recovered" in rep
    assert (out / "quantized" / "model.safetensors").exists()
    assert "[4/4] evaluate" in p.stdout
