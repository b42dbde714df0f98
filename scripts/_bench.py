"""Shared benchmark harness: medians over repeats after warm-up, results to CSV + JSON,
markdown tables. Runs side by side in one process, so ratios compare like with like on a
noisy machine."""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

_SCRATCH: list = []


def flush_caches(mb: int = 128) -> None:
    """Write a buffer larger than the last-level cache (32 MB here) so the next timed call
    reads its inputs from DRAM, as it would inside a model whose weights don't fit in cache."""
    import torch
    if not _SCRATCH:
        _SCRATCH.append(torch.zeros(mb * 2**20 // 4, dtype=torch.float32))
    _SCRATCH[0].add_(1.0)


def median_ms(fn, repeats: int = 20, warmup: int = 3, min_time_s: float = 0.0, cold: bool = True) -> float:
    """Median wall time of fn() in ms; cold=True flushes caches before every timed call."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time_s
    while len(times) < repeats or time.perf_counter() < t_end:
        if cold:
            flush_caches()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def write_results(rows: list[dict], stem: str | Path, meta: dict | None = None) -> tuple[Path, Path]:
    from lowbit.utils.io import atomic_path, write_json
    stem = Path(stem)
    write_json(stem.with_suffix(".json"), {"meta": meta or {}, "rows": rows})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict:
    import os
    import platform

    import torch
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def run_side(script: str, side: str, args: list[str]) -> dict:
    """Run `script --side SIDE args...` in a fresh process (its own peak RSS, no warm caches) → its last stdout line
    as JSON; a failed side stops the benchmark with its stderr."""
    import json
    import subprocess
    import sys
    p = subprocess.run([sys.executable, script, "--side", side, *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{side} failed:\n{p.stderr[-3000:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    print(side, {k: v for k, v in result.items() if k != "losses"}, flush=True)
    return result


def save_json(result: dict, out: str | Path) -> None:
    import json
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
