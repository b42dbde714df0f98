"""Packing throughput on a real mixed-length set: tokens/s of real (non-pad) tokens, packed vs unpacked.

Both sides run the same recipe (same config, steps, batch size) in their own process; the only change is
`data.packing`. Real tokens are counted in the collator (every example's own length, padding excluded), so
tokens/s = real tokens trained on / train runtime.

  .venv/bin/python scripts/benchmark_packing.py --config configs/qlora/smollm2-135m-chat.yaml --steps 10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import run_side, save_json  # noqa: E402


def _child(config: str, packing: bool, steps: int, overrides: list[str]) -> dict:
    import lowbit.recipes.phases as phases
    from lowbit.recipes import run
    from lowbit.recipes.config import load_config
    counted = {"real": 0, "slots": 0}

    class Counting(phases.Collator):
        def __call__(self, batch):
            out = super().__call__(batch)
            counted["real"] += sum(len(b["input_ids"]) for b in batch)
            counted["slots"] += out["input_ids"].numel()
            return out
    phases.Collator = Counting
    out = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    cfg = load_config(config, [f"train.output_dir={out}", f"train.max_steps={steps}", "train.save_steps=0",
                               "train.report_to=[jsonl]", "eval.before=false", "eval.after=false",
                               f"data.packing={str(packing).lower()}", *overrides])
    m = run(cfg)
    return {"train_runtime_s": m["train_runtime_s"], "train_rows": m["train_examples"], **counted,
            "real_tokens_per_s": counted["real"] / m["train_runtime_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/qlora/smollm2-135m-chat.yaml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="outputs/bench_packing.json")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.side:
        print(json.dumps(_child(a.config, a.side == "packed", a.steps, a.overrides)))
        return
    result = {"config": a.config, "steps": a.steps, "overrides": a.overrides}
    for side in ("packed", "unpacked"):
        result[side] = run_side(__file__, side, ["--config", a.config, "--steps", str(a.steps), *a.overrides])
    result["real_tokens_per_s_ratio"] = result["packed"]["real_tokens_per_s"] / result["unpacked"]["real_tokens_per_s"]
    save_json(result, a.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("packed", "unpacked")}, indent=2))


if __name__ == "__main__":
    main()
