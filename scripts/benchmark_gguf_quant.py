"""Time lowbit's GGUF quantizers (the C++ kernels and the torch reference) against llama.cpp's reference C code on the
tensors of one model, side by side in one run.

Each tensor gets the type llama-quantize would give it for --ftype (lowbit.format.ggml_quants.filetypes) and is
quantized by every implementation: lowbit's C++ path (lowbit.kernels.ggml.quantize_ggml, the CPU kernels' vector path
named in the output), lowbit's torch path (lowbit.format.ggml_quants.quantize; --no-torch skips it) and the C one
(built by lowbit.testing.ggml_oracle). Each runs on 1 thread (CPU time of this process) and on --threads threads
(wall time; torch threads for lowbit, a row split for C); the bytes are compared with C's. Tensors come from a
safetensors folder (--model; default the local gemma-3-270m if present) or are random matrices with Gemma-3-270M's
shapes.

    python scripts/benchmark_gguf_quant.py --threads 2 --out outputs/bench_gguf_quant.json [--imatrix]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.format import ggml_quants as gq  # noqa: E402
from lowbit.format.ggml_quants.filetypes import ModelParams, tensor_types  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / ".cache" / "models" / "gemma-3-270m"

def gguf_names(keys, model_type: str, n_layer: int) -> dict[str, str]:
    """{HF tensor name: GGUF name} through gguf-py's tensor map, as the GGUF writer names them."""
    import gguf

    from lowbit.models.gguf_arch import GGUF_ARCHS
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCHS.get(model_type, "LLAMA")), n_layer)
    out = {}
    for k in keys:
        base, _, suffix = k.rpartition(".")
        new = name_map.get_name(base)
        if new is not None:
            out[k] = f"{new}.{suffix}"
    return out


def gemma3_270m_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, 640), "output_norm.weight": (640,)}
    for i in range(18):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": (1024, 640), p + "attn_k.weight": (256, 640), p + "attn_v.weight": (256, 640),
                  p + "attn_output.weight": (640, 1024), p + "ffn_gate.weight": (2048, 640),
                  p + "ffn_up.weight": (2048, 640), p + "ffn_down.weight": (640, 2048),
                  p + "attn_norm.weight": (640,)})
    return t


def load_tensors(args) -> tuple[dict[str, torch.Tensor], ModelParams, str]:
    model = Path(args.model) if args.model else (DEFAULT_MODEL if DEFAULT_MODEL.exists() else None)
    if args.random:
        model = None
    if model is not None and not any(model.glob("*.safetensors")):
        raise SystemExit(f"no *.safetensors in {model}")
    if model is not None:
        from safetensors import safe_open
        cfg = json.loads((model / "config.json").read_text()) if (model / "config.json").exists() else {}
        cfg = cfg.get("text_config", cfg)
        tensors = {}
        for f in sorted(model.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                names = gguf_names(sf.keys(), cfg.get("model_type", "llama"), int(cfg.get("num_hidden_layers", 0)))
                for k, name in names.items():
                    tensors[name] = sf.get_tensor(k)
        mp = ModelParams(n_layer=int(cfg.get("num_hidden_layers", 0)), n_expert=int(cfg.get("num_local_experts", 0)),
                         n_head=int(cfg.get("num_attention_heads", 0)),
                         n_head_kv=int(cfg.get("num_key_value_heads", cfg.get("num_attention_heads", 0))),
                         arch=str(cfg.get("model_type", "llama")))
        return tensors, mp, str(model)
    g = torch.Generator().manual_seed(0)
    shapes = gemma3_270m_shapes(args.vocab)
    tensors = {n: (torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()}
    return tensors, ModelParams(n_layer=18, n_head=4, n_head_kv=1, arch="gemma3"), "random (Gemma-3-270M shapes)"


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """(best wall ms, best CPU ms of this process, result). CPU time is what a single-threaded run costs even
    when other processes share the cores; with threads only the wall time says anything."""
    wall = cpu = float("inf")
    out = None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall * 1e3, cpu * 1e3, out


def _as_np(out) -> np.ndarray:
    return out.numpy() if isinstance(out, torch.Tensor) else out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="safetensors folder (default: .cache/models/gemma-3-270m if present)")
    ap.add_argument("--random", action="store_true", help="random tensors with Gemma-3-270M shapes")
    ap.add_argument("--vocab", type=int, default=262144, help="token_embd rows for --random")
    ap.add_argument("--ftype", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for the multi-threaded runs (torch threads for ours, row split for C)")
    ap.add_argument("--imatrix", action="store_true", help="also pass a random positive importance matrix")
    ap.add_argument("--no-torch", action="store_true", help="leave out lowbit's (slow) torch path")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument("--skip", default="", help="regex of tensor names to leave out")
    ap.add_argument("--out", default="outputs/bench_gguf_quant.json")
    args = ap.parse_args()

    from lowbit.kernels.cpu import build
    from lowbit.kernels.ggml import backend, quantize_ggml
    from lowbit.testing import ggml_oracle
    try:
        oracle = ggml_oracle.load()
    except ggml_oracle.OracleUnavailable as e:
        print(f"cannot build the llama.cpp reference quantizer: {e}", file=sys.stderr)
        return 2
    if backend() != "cpp":
        print("the C++ CPU kernels are not available (no compiler, or LOWBIT_KERNELS=reference)", file=sys.stderr)
        return 2
    isa = torch.ops.lowbit_cpu.ggml_isa()
    print(f"lowbit C++ path: {isa} (LOWBIT_CPU_ISA={os.environ.get('LOWBIT_CPU_ISA', '') or 'auto'}; "
          f"this CPU supports {build.supported_isas()})")

    tensors, mp, source = load_tensors(args)
    types = tensor_types({n: tuple(t.shape) for n, t in tensors.items()}, args.ftype, mp,
                         has_imatrix=args.imatrix)
    rng = np.random.default_rng(0)
    nt = args.threads
    impls = ["cpp", "c"] if args.no_torch else ["cpp", "torch", "c"]
    rows, skipped = [], []
    for name, qtype in types.items():
        if qtype not in gq.SUPPORTED_TYPES or (args.skip and re.search(args.skip, name)):
            skipped.append((name, qtype))
            continue
        w = tensors[name]
        xn = w.float().contiguous().numpy()
        qw = (rng.random(w.shape[-1]) * rng.random(w.shape[-1]) + 1e-3).astype(np.float32) if args.imatrix else None
        qwt = None if qw is None else torch.from_numpy(qw)
        x32 = torch.from_numpy(xn)  # every side gets the same fp32 values (bf16 -> fp32 is not timed)
        fns = {"cpp": lambda: quantize_ggml(x32, qtype, qwt), "torch": lambda: gq.quantize(x32, qtype, qwt),
               "c": lambda threads: oracle.quantize(xn, qtype, qw, nthread=threads)}
        row = {"tensor": name, "shape": list(w.shape), "type": qtype, "numel": w.numel()}
        outs = {}
        for impl in impls:
            for threads in (1, nt) if nt > 1 else (1,):
                torch.set_num_threads(threads)
                fn = (lambda t=threads: fns["c"](t)) if impl == "c" else fns[impl]
                wall, cpu, out = timed(fn, args.repeat)
                row[f"{impl}_{threads}t_ms"] = wall
                if threads == 1:
                    row[f"{impl}_1t_cpu_ms"] = cpu
                outs[(impl, threads)] = _as_np(out)
            if nt == 1:
                row[f"{impl}_{nt}t_ms"] = row[f"{impl}_1t_ms"]
        ref = outs[("c", 1)]
        row["identical"] = all(np.array_equal(o, ref) for o in outs.values())
        rows.append(row)
        tail = f" torch {row['torch_1t_cpu_ms']:8.1f}" if "torch" in impls else ""
        print(f"{name:30s} {str(tuple(w.shape)):14s} {qtype:5s} CPU ms 1t: C++ {row['cpp_1t_cpu_ms']:7.1f}{tail} "
              f"C {row['c_1t_cpu_ms']:8.1f} ({row['cpp_1t_cpu_ms'] / row['c_1t_cpu_ms']:5.3f})  wall ms {nt}t: "
              f"C++ {row[f'cpp_{nt}t_ms']:7.1f} C {row[f'c_{nt}t_ms']:8.1f}  {'==' if row['identical'] else 'DIFFERENT'}",
              flush=True)

    keys = [k for k in rows[0] if k.endswith("_ms")] if rows else []

    def totals(sel):
        sub = [r for r in rows if sel(r)]
        t = {"tensors": len(sub), "numel": sum(r["numel"] for r in sub)}
        t.update({k: sum(r[k] for r in sub) for k in keys})
        for impl in impls[:-1]:
            t[f"ratio_cpu_1t_{impl}_over_c"] = t[f"{impl}_1t_cpu_ms"] / t["c_1t_cpu_ms"]
            t[f"ratio_wall_{nt}t_{impl}_over_c"] = t[f"{impl}_{nt}t_ms"] / t[f"c_{nt}t_ms"]
        return t

    per_type = {t: totals(lambda r, t=t: r["type"] == t) for t in sorted({r["type"] for r in rows})}
    summary = totals(lambda r: True)
    summary["all_identical"] = all(r["identical"] for r in rows)

    cols = [("C++", "cpp")] + ([("torch", "torch")] if "torch" in impls else []) + [("C", "c")]
    print(f"\n{'type':6s} {'tensors':>7s} {'Mvalues':>8s} | CPU ms, 1 thread: " + " ".join(f"{c:>8s}" for c, _ in cols)
          + f" {'C++/C':>6s} | wall ms, {nt} threads: " + " ".join(f"{c:>8s}" for c, _ in cols) + f" {'C++/C':>6s}")
    for t, v in list(per_type.items()) + [("total", summary)]:
        print(f"{t:6s} {v['tensors']:7d} {v['numel'] / 1e6:8.1f} | {'':18s}"
              + " ".join(f"{v[f'{k}_1t_cpu_ms']:8.1f}" for _, k in cols) + f" {v['ratio_cpu_1t_cpp_over_c']:6.3f} | "
              + f"{'':18s}" + " ".join(f"{v[f'{k}_{nt}t_ms']:8.1f}" for _, k in cols)
              + f" {v[f'ratio_wall_{nt}t_cpp_over_c']:6.3f}")
    print(f"bytes identical to llama.cpp: {summary['all_identical']}  (C++ path: {isa})")
    if skipped:
        print(f"not timed (type not implemented here or skipped): {len(skipped)} tensors, e.g. {skipped[:3]}")

    meta = {"source": source, "ftype": args.ftype, "imatrix": args.imatrix, "threads": args.threads,
            "repeat": args.repeat, "cpp_isa": isa, "supported_isas": build.supported_isas(), "impls": impls,
            "llama_cpp_python_sdist": oracle.version, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "summary": summary, "per_type": per_type, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
