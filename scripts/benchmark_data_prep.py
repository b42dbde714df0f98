"""Chat data preparation at scale: lowbit's pipeline vs TRL's own SFTTrainer preparation, side by side.

Writes N synthetic chat rows (JSONL), then prepares them in a fresh process per side (tokenize with the
chat template, BFD-pack to max_length) and reports wall time and peak RSS; a third process streams the
rows (data.streaming=true) to show RSS does not grow with the row count. The datasets cache is a fresh
folder per process, so nothing is reused between sides or runs.

  .venv/bin/python scripts/benchmark_data_prep.py --rows 1000000 --tokenizer .cache/models/smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("to be or not that is the question whether tis nobler in mind suffer slings arrows of outrageous fortune "
         "take arms against a sea troubles and by opposing end them die sleep no more").split()


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            turns = []
            for _ in range(rng.randint(1, 2)):
                turns.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 40)))})
                turns.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 60)))})
            f.write(json.dumps({"messages": turns}) + "\n")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_lowbit(rows: str, tok_path: str, max_len: int, num_proc: int | None, streaming: bool) -> dict:
    from transformers import AutoTokenizer

    from lowbit.recipes.config import DataConfig
    from lowbit.recipes.data import train_dataset
    tok = AutoTokenizer.from_pretrained(tok_path)
    cfg = DataConfig(format="chat", train_files=[rows], max_seq_len=max_len, num_proc=num_proc, streaming=streaming)
    t0 = time.perf_counter()
    ds = train_dataset(tok, cfg)
    n = sum(1 for _ in ds) if streaming else len(ds)
    return {"seconds": time.perf_counter() - t0, "packed_rows": n}


def side_trl(rows: str, tok_path: str, max_len: int, num_proc: int | None) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    tok = AutoTokenizer.from_pretrained(tok_path)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # only to construct the trainer
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=rows, split="train")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=max_len, packing=True, packing_strategy="bfd",
                     dataset_num_proc=num_proc, report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    return {"seconds": time.perf_counter() - t0, "packed_rows": len(trainer.train_dataset)}


def _child(a) -> None:
    import datasets
    datasets.config.HF_DATASETS_CACHE = Path(tempfile.mkdtemp(prefix="lowbit-bench-cache-"))
    if a.side == "trl":
        r = side_trl(a.rows_file, a.tokenizer, a.max_len, a.num_proc)
    else:
        r = side_lowbit(a.rows_file, a.tokenizer, a.max_len, a.num_proc, streaming=a.side == "lowbit-streaming")
    print(json.dumps({**r, "peak_rss_mb": _peak_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--tokenizer", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench_data_prep.json")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        return _child(a)
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    rows = work / "chat.jsonl"
    write_rows(rows, a.rows)
    print(f"{a.rows} rows, {rows.stat().st_size / 2**20:.0f} MiB", flush=True)
    result = {"rows": a.rows, "tokenizer": a.tokenizer, "max_len": a.max_len, "num_proc": a.num_proc}
    for side in ("lowbit", "trl", "lowbit-streaming"):
        cmd = [sys.executable, __file__, "--side", side, "--rows-file", str(rows), "--tokenizer", a.tokenizer,
               "--max-len", str(a.max_len)] + (["--num-proc", str(a.num_proc)] if a.num_proc else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{side} failed:\n{p.stderr[-3000:]}")
        result[side] = json.loads(p.stdout.strip().splitlines()[-1])
        print(side, result[side], flush=True)
    result["time_ratio_trl_over_lowbit"] = result["trl"]["seconds"] / result["lowbit"]["seconds"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
