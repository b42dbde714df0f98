"""QAT toward GGUF file types on Gemma-3-270M: held-out Hamlet perplexity of the exported .gguf files, read back.

One invocation, side by side, same budget (steps × batch × sequence length) for every trained row:
  speed  ms per fake-quant pass over every targeted linear (Q4_K_M mix, Q4_0), beside one bf16 train step;
  (a)    Q4_K_M and Q4_0: round-to-nearest export of the bf16 model vs QAT by distillation from it (KL, LoRA on the
         16-bit base, Shakespeare text without Hamlet) exported as the same type: share of the perplexity drop
         removed = (ppl_RTN − ppl_QAT) / (ppl_RTN − ppl_bf16);
  (b)    QLoRA fine-tune (NF4 base) then a Q4_K_M export: naive merge into deq(NF4) then quantize, merge into the
         original 16-bit weights then quantize, merge-aware QAT (qat.scheme=gguf-q4_k_m on the NF4 base):
         share of the fine-tune's gain that survives = (ppl_NF4 − ppl_file) / (ppl_NF4 − ppl_QLoRA).

Every GGUF perplexity is that of the written file read back (its tensors decoded into the HF model, fp32 compute);
the trained models' own (fake-quant, bf16 compute) perplexities are reported beside them.

    .venv/bin/python scripts/benchmark_gguf_qat.py [--steps 64] [--batch 4] [--seq 128] [--lr 5e-4]
                                                   [--eval-blocks 32] [--out outputs/bench/gguf_qat] [--parts ...]
Numbers go to <out>/results.json as they are measured; rerunning with the same settings resumes.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_qat import Results  # noqa: E402  (one resumable results file, as the other QAT benchmarks)

DISTILL = "configs/qlora/gemma3-270m-gguf-distill.yaml"
QLORA = "configs/qlora/gemma3-270m-gguf-q4_k_m.yaml"
TEXT = "data/shakespeare/heldout_hamlet.txt"
TYPES = ("Q4_K_M", "Q4_0")


def _cfg(a, config: str, out: str, *extra):
    from lowbit.recipes.config import load_config
    return load_config(config, [f"model.path={a.model}", f"train.output_dir={a.out}/{out}", f"train.max_steps={a.steps}",
                                f"train.batch_size={a.batch}", f"train.lr={a.lr}", f"data.max_seq_len={a.seq}",
                                f"data.max_eval_blocks={a.eval_blocks}", "eval.before=false", "train.report_to=[jsonl]",
                                "train.overwrite_output=true", "train.save_steps=0",
                                "train.gradient_checkpointing=false", "train.warmup_steps=4", *extra])


def _train(a, config, out, *extra) -> dict:
    from lowbit.recipes import run
    t0 = time.perf_counter()
    m = run(_cfg(a, config, out, *extra))
    gc.collect()
    print(f"  {out}: eval ppl (trained model) {m['eval_ppl_after']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"ppl": m["eval_ppl_after"], "train_s": m.get("train_runtime_s"), "train_loss": m.get("train_loss")}


def _file_ppl(a, source, gguf_type, name: str, merge_into: str = "trained") -> dict:
    """Export `source` (a run, a dense folder) as `gguf_type`, then the file's own perplexity, read back."""
    from lowbit.export.cli import _hf_dir, gguf_perplexity
    from lowbit.export.formats import export_gguf_file
    out = Path(a.out) / f"{name}.gguf"
    t0 = time.perf_counter()
    rep = export_gguf_file(source, out, gguf_type=gguf_type, overwrite=True, verify=False, progress=False,
                           merge_into=merge_into)
    export_s = time.perf_counter() - t0
    ppl = gguf_perplexity(out, TEXT, _hf_dir(source) or a.model, a.seq, a.eval_blocks)
    print(f"  {name}: {gguf_type} file ppl {ppl:.3f} (export {export_s:.0f} s, {rep['bytes'] / 2**20:.0f} MiB)",
          flush=True)
    return {"ppl": ppl, "bytes": rep["bytes"], "export_s": export_s, "tensor_types": rep["tensor_types"]}


def _dense_ppl(a, model, desc) -> float:
    from transformers import AutoTokenizer

    from lowbit.recipes.config import DataConfig
    from lowbit.recipes.data import _eval_config, build_examples
    from lowbit.recipes.loss import perplexity
    from lowbit.utils.batching import Collator
    tok = AutoTokenizer.from_pretrained(a.model)
    cfg = _eval_config(DataConfig(train_files=[TEXT], eval_files=[TEXT], max_seq_len=a.seq))
    ex = build_examples([TEXT], tok, cfg)[:a.eval_blocks]
    ppl = perplexity(model, ex, Collator(tok.pad_token_id, model.config), 4, 256, desc)
    print(f"  {desc}: {ppl:.3f}", flush=True)
    return ppl


def _load(a, four_bit=False, compute="float32", adapter=None):
    from lowbit.models import load_model
    from lowbit.modules.lora import load_adapter
    m, _ = load_model(a.model, load_in_4bit=four_bit, compute_dtype=compute, progress=False)
    return load_adapter(m, adapter) if adapter else m


def _speed(a) -> dict:
    """Fake-quant pass over every targeted linear (CPU s and wall ms) beside one bf16 forward+backward step."""
    import torch

    import lowbit.methods.qat as qat
    from lowbit.methods.qat.linear import QATLinearMixin, effective_weight
    model = _load(a, compute="bfloat16")
    ids = torch.randint(0, 1000, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    out = {}

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    step()
    c, t = time.process_time(), time.perf_counter()
    step()
    out["bf16 train step"] = {"wall_ms": 1e3 * (time.perf_counter() - t), "cpu_ms": 1e3 * (time.process_time() - c)}
    for ftype in TYPES:
        qat.prepare(model, f"gguf-{ftype.lower()}")
        layers = [m for m in model.modules() if isinstance(m, QATLinearMixin) and m.lowbit_weight_fq is not None]
        n = sum(m.weight.numel() for m in layers)
        c, t = time.process_time(), time.perf_counter()
        for m in layers:
            m.lowbit_weight_fq.gguf_layout(effective_weight(m))
        out[f"fake-quant pass {ftype}"] = {"wall_ms": 1e3 * (time.perf_counter() - t),
                                           "cpu_ms": 1e3 * (time.process_time() - c), "values": n,
                                           "layers": len(layers)}
        qat.unprepare(model)
    for k, v in out.items():
        print(f"  {k}: {v['wall_ms']:.0f} ms wall, {v['cpu_ms']:.0f} ms CPU", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--out", default="outputs/bench/gguf_qat")
    ap.add_argument("--parts", nargs="*", default=["speed", "a", "b"], choices=["speed", "a", "b"])
    ap.add_argument("--types", nargs="*", default=list(TYPES), choices=TYPES, help="(a): file types, in this order")
    ap.add_argument("--plot", default="docs/gguf_qat.png")
    a = ap.parse_args()
    from _bench import machine_info, markdown_table, write_results
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", {k: getattr(a, k) for k in ("steps", "batch", "seq", "lr", "eval_blocks")})
    t_start = time.perf_counter()
    if "speed" in a.parts:
        res.get_or("speed", lambda: _speed(a))
    res.get_or("bf16", lambda: _dense_ppl(a, _load(a), "bf16 model (fp32 compute)"))
    rows_a, rows_b = [], []
    if "a" in a.parts:
        for t in a.types:
            rtn = res.get_or(f"RTN {t}", lambda t=t: _file_ppl(a, a.model, t, f"rtn-{t.lower()}"))
            name = f"qat-{t.lower()}"
            tr = res.get_or(f"QAT {t} trained", lambda t=t, name=name: _train(a, DISTILL, name,
                                                                             f"qat.scheme=gguf-{t.lower()}"))
            ex = res.get_or(f"QAT {t} file", lambda t=t, name=name: _file_ppl(a, f"{a.out}/{name}", None, name))
            rows_a.append({"file type": t, "bf16": res["bf16"], "RTN file": rtn["ppl"], "QAT file": ex["ppl"],
                           "QAT fake-quant (bf16)": tr["ppl"],
                           "drop removed": (rtn["ppl"] - ex["ppl"]) / (rtn["ppl"] - res["bf16"])})
    if "b" in a.parts:
        four = ["model.quant.load_in_4bit=true"]
        nf4 = res.get_or("NF4 base", lambda: _dense_ppl(a, _load(a, four_bit=True), "NF4 base (fp32 compute)"))
        ft = res.get_or("QLoRA trained", lambda: _train(a, QLORA, "qlora", *four, "qat.scheme="))
        naive = res.get_or("naive file", lambda: _file_ppl(a, f"{a.out}/qlora", "Q4_K_M", "qlora-naive-q4_k_m"))
        m16 = res.get_or("16-bit merge file", lambda: _file_ppl(a, f"{a.out}/qlora", "Q4_K_M", "qlora-merge16-q4_k_m",
                                                                merge_into="16bit"))  # lowbit export --merge-into 16bit
        aw = res.get_or("aware trained", lambda: _train(a, QLORA, "qlora-aware", *four, "qat.scheme=gguf-q4_k_m"))
        awf = res.get_or("aware file", lambda: _file_ppl(a, f"{a.out}/qlora-aware", None, "qlora-aware-q4_k_m"))
        for name, tr, f in (("naive: merge into deq(NF4), quantize", ft, naive),
                            ("merge into 16-bit weights, quantize", ft, m16),
                            ("merge-aware QAT (gguf-q4_k_m)", aw, awf)):
            rows_b.append({"export": name, "NF4 base": nf4, "QLoRA trained": ft["ppl"], "trained (this row)": tr["ppl"],
                           "Q4_K_M file": f["ppl"], "gain surviving": (nf4 - f["ppl"]) / (nf4 - ft["ppl"])})
    res["total_s_this_invocation"] = time.perf_counter() - t_start
    meta = {**machine_info(), **res}
    for rows, stem in ((rows_a, "gguf_qat_rtn"), (rows_b, "gguf_qat_merge")):
        if rows:
            write_results(rows, out / stem, meta)
            print(markdown_table(rows, list(rows[0])))
    if rows_a or rows_b:
        _plot(rows_a, rows_b, Path(a.plot), a)
    print(json.dumps(res, indent=1, default=str))
    return 0


def _plot(rows_a, rows_b, path: Path, a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    if rows_a:
        ax = axes[0]
        x = range(len(rows_a))
        for i, (key, label) in enumerate((("bf16", "bf16"), ("RTN file", "round-to-nearest"), ("QAT file", "QAT"))):
            ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows_a], 0.27, label=label)
        ax.set_xticks(list(x), [f"{r['file type']}\n{100 * r['drop removed']:.0f} % removed" for r in rows_a])
        ax.set_ylabel("Hamlet perplexity of the .gguf file")
        ax.set_title("(a) QAT by distillation vs RTN")
        ax.legend(fontsize=8)
    if rows_b:
        ax = axes[1]
        ax.bar(range(len(rows_b)), [100 * r["gain surviving"] for r in rows_b], 0.5)
        ax.axhline(95, color="k", ls="--", lw=1, label="target 95 %")
        ax.set_xticks(range(len(rows_b)), ["naive\n(deq NF4)", "16-bit\nmerge", "merge-aware\nQAT"])
        ax.set_ylabel("fine-tune gain surviving Q4_K_M (%)")
        ax.set_title("(b) QLoRA → Q4_K_M GGUF")
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(a.model).name}, {a.steps} steps × {a.batch} × {a.seq} tokens", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
