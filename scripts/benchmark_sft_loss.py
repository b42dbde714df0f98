"""lowbit's chunked vocabulary loss vs TRL's own SFT loss, same run otherwise, side by side.

Both sides are the real recipe (`lowbit.recipes.run`, a TRL SFTTrainer underneath) on the same config,
data and seed; the TRL side only swaps `compute_loss` back to `SFTTrainer.compute_loss` (the model's
forward with labels: full [batch, seq, vocab] logits, plus TRL's entropy / token-accuracy metrics).
Each side runs in its own process so peak RSS is its own; steps/s excludes the first (warm-up) step.

  .venv/bin/python scripts/benchmark_sft_loss.py --config configs/qlora/gemma3-270m-shakespeare.yaml --steps 8
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import run_side, save_json  # noqa: E402


def _child(config: str, side: str, steps: int, overrides: list[str]) -> dict:
    from trl import SFTTrainer

    import lowbit.recipes.trainer as T
    from lowbit.recipes import run
    from lowbit.recipes.config import load_config
    if side == "trl":
        T.LowbitTrainer.compute_loss = SFTTrainer.compute_loss
    out = Path(tempfile.mkdtemp(prefix=f"bench-loss-{side}-"))
    cfg = load_config(config, [f"train.output_dir={out}", f"train.max_steps={steps}", "train.save_steps=0",
                               "train.logging_steps=1", "train.report_to=[jsonl]", "eval.before=false",
                               "eval.after=false", "train.warmup_steps=0", *overrides])
    m = run(cfg)
    log = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    return {"train_runtime_s": m["train_runtime_s"], "losses": losses,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/qlora/gemma3-270m-shakespeare.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="outputs/bench_sft_loss.json")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.side:
        print(json.dumps(_child(a.config, a.side, a.steps, a.overrides)))
        return
    result = {"config": a.config, "steps": a.steps, "overrides": a.overrides}
    for side in ("lowbit", "trl"):
        result[side] = run_side(__file__, side, ["--config", a.config, "--steps", str(a.steps), *a.overrides])
    lo, tr = result["lowbit"], result["trl"]
    result["speedup_trl_time_over_lowbit"] = tr["train_runtime_s"] / lo["train_runtime_s"]
    result["rss_ratio_trl_over_lowbit"] = tr["peak_rss_mb"] / lo["peak_rss_mb"]
    result["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(lo["losses"], tr["losses"], strict=True))
    save_json(result, a.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("lowbit", "trl")}, indent=2))


if __name__ == "__main__":
    main()
