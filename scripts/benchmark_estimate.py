"""`lowbit estimate` vs measured peak memory of real training steps on the CPU.

Each case runs in its own subprocess: load the model the way the trainer does (4-bit base,
LoRA, the chunked loss, AdamW), run --steps optimizer steps, and read the kernel's peak RSS
(VmHWM). Measured = peak RSS during training − the runtime, where runtime = RSS after loading
minus the bytes of the model's own tensors (Python, torch and the libraries the load pulled
in), so it holds what the estimator counts: weights, adapters, gradients, optimizer state,
activations, logits and workspace. The peak is reset (/proc/self/clear_refs) after loading,
so the load's own transient does not count. The children run with MALLOC_MMAP_THRESHOLD_=65536
so glibc returns freed tensors to the OS instead of keeping them in its heap: RSS then tracks
live tensors (like a CUDA allocator's allocated, not reserved, bytes).

    .venv/bin/python scripts/benchmark_estimate.py [--steps 3] [--out outputs/bench/estimate]

Measurements are kept in <out>.measured.json (keyed by case and steps): a rerun only measures
what is missing and recomputes every estimate, so the estimator can be revised against them.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

GEMMA = ROOT / ".cache/models/gemma-3-270m"
# name, model (None = tiny llama built here), seq, batch, compute dtype, gradient checkpointing, lora dropout
CASES = [
    ("tiny-llama (h512, 4 layers, vocab 512)", None, 512, 8, "float32", False, 0.0),
    ("tiny-llama (h512, 4 layers, vocab 512)", None, 512, 8, "float32", True, 0.0),
    # compute dtype as `compute_dtype: auto` picks it on the box that measured (fp32: AVX2 only)
    ("gemma-3-270m", GEMMA, 256, 2, "float32", True, 0.0),
    ("gemma-3-270m", GEMMA, 256, 2, "float32", False, 0.0),
    ("gemma-3-270m", GEMMA, 256, 2, "float32", True, 0.05),
]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so RSS shows what is live


def measure(model_dir: str, seq: int, batch: int, dtype: str, gc_on: bool, dropout: float, steps: int) -> dict:
    import torch

    from lowbit.models import load_model
    from lowbit.modules.lora import add_lora, prepare_for_kbit_training
    from lowbit.recipes.loss import causal_lm_loss
    from lowbit.recipes.optim import build_optimizer
    torch.manual_seed(0)
    model, _ = load_model(model_dir, compute_dtype=dtype, progress=False)
    prepare_for_kbit_training(model, gc_on)
    model = add_lora(model, r=16, alpha=32, dropout=dropout, target_modules="all-linear")
    model.train()
    opt = build_optimizer("adamw_torch", model.parameters(), 1e-4, 0.0)
    vocab = model.get_base_model().config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq))
    _trim()
    loaded = _status("VmRSS")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    tensors = sum(storages.values())
    runtime = loaded - tensors
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        loss = causal_lm_loss(model, ids, ids, None, 256)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _status("VmHWM")
    return {"runtime_mb": runtime / 2**20, "loaded_mb": tensors / 2**20,
            "measured_mb": (peak - runtime) / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="outputs/bench/estimate")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(**json.loads(a.child), steps=a.steps)))
        return 0

    from _bench import machine_info, markdown_table, write_results

    from lowbit.estimate.memory import GiB, ModelShape, Setup, estimate
    from lowbit.testing import save_tiny_model
    from lowbit.utils.io import write_json
    rows = []
    cache_path = Path(a.out + ".measured.json")
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_model(Path(tmp) / "tiny", "llama", hidden=512, layers=4)
        for name, model, seq, batch, dtype, gc_on, dropout in CASES:
            path = str(model or tiny)
            child = {"model_dir": path, "seq": seq, "batch": batch, "dtype": dtype, "gc_on": gc_on, "dropout": dropout}
            key = json.dumps([name, seq, batch, dtype, gc_on, dropout, a.steps])
            if key not in cache:
                p = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", json.dumps(child)],
                                   capture_output=True, text=True, cwd=ROOT,
                                   env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"})
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                cache[key] = json.loads(p.stdout.strip().splitlines()[-1])
                write_json(cache_path, cache)
            m = cache[key]
            est = estimate(ModelShape.load(path), Setup(seq=seq, batch=batch, compute_dtype=dtype,
                                                        gradient_checkpointing=gc_on, lora_dropout=dropout))
            est_mb = est["total"] / 2**20
            row = {"model": name, "seq x batch": f"{seq} x {batch}", "compute": dtype,
                   "grad ckpt": "on" if gc_on else "off", "lora dropout": dropout,
                   "estimated MiB": round(est_mb, 1), "measured MiB": round(m["measured_mb"], 1),
                   "error %": round(100 * (est_mb - m["measured_mb"]) / m["measured_mb"], 1),
                   "est. weights+adapters MiB": round((est["weights"] + est["adapters"]) / 2**20, 1),
                   "model tensors MiB": round(m["loaded_mb"], 1),
                   "runtime MiB (excluded)": round(m["runtime_mb"], 1)}
            rows.append(row)
            print(row, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(rows, a.out, {"machine": machine_info(), "steps": a.steps, "GiB": GiB})
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
