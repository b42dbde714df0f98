"""Time our GGUF quantizers (torch) against llama.cpp's reference C code on the tensors of one model.

Each tensor gets the type llama-quantize would give it for --ftype (lowbit.format.ggml_quants.filetypes), is quantized by
both implementations (the C one built by lowbit.testing.ggml_oracle, run on 1 thread and on --threads threads
split by rows), and the bytes are compared. Tensors come from a safetensors folder (--model; default the local
gemma-3-270m if present) or are random matrices with Gemma-3-270M's shapes.

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="safetensors folder (default: .cache/models/gemma-3-270m if present)")
    ap.add_argument("--random", action="store_true", help="random tensors with Gemma-3-270M shapes")
    ap.add_argument("--vocab", type=int, default=262144, help="token_embd rows for --random")
    ap.add_argument("--ftype", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for the multi-threaded runs (torch threads for ours, row split for C)")
    ap.add_argument("--imatrix", action="store_true", help="also pass a random positive importance matrix")
    ap.add_argument("--repeat", type=int, default=1, help="best of N timings")
    ap.add_argument("--skip", default="", help="regex of tensor names to leave out")
    ap.add_argument("--out", default="outputs/bench_gguf_quant.json")
    args = ap.parse_args()

    from lowbit.testing import ggml_oracle
    try:
        oracle = ggml_oracle.load()
    except ggml_oracle.OracleUnavailable as e:
        print(f"cannot build the llama.cpp reference quantizer: {e}", file=sys.stderr)
        return 2

    tensors, mp, source = load_tensors(args)
    types = tensor_types({n: tuple(t.shape) for n, t in tensors.items()}, args.ftype, mp,
                         has_imatrix=args.imatrix)
    rng = np.random.default_rng(0)
    nt = args.threads
    rows, skipped = [], []
    for name, qtype in types.items():
        if qtype not in gq.SUPPORTED_TYPES or (args.skip and re.search(args.skip, name)):
            skipped.append((name, qtype))
            continue
        w = tensors[name]
        xn = w.float().contiguous().numpy()
        qw = (rng.random(w.shape[-1]) * rng.random(w.shape[-1]) + 1e-3).astype(np.float32) if args.imatrix else None
        qwt = None if qw is None else torch.from_numpy(qw)
        torch.set_num_threads(1)
        x32 = torch.from_numpy(xn)  # both sides get the same fp32 values (bf16 -> fp32 is not timed)
        o1_wall, o1_cpu, ours = timed(lambda: gq.quantize(x32, qtype, qwt), args.repeat)
        torch.set_num_threads(nt)
        on_wall, _, ours_n = timed(lambda: gq.quantize(x32, qtype, qwt), args.repeat) if nt > 1 else (o1_wall, 0, ours)
        c1_wall, c1_cpu, ref = timed(lambda: oracle.quantize(xn, qtype, qw, nthread=1), args.repeat)
        cn_wall, _, _ = timed(lambda: oracle.quantize(xn, qtype, qw, nthread=nt), args.repeat) if nt > 1 else (
            c1_wall, 0, None)
        same = bool(np.array_equal(ours.numpy(), ref) and np.array_equal(ours_n.numpy(), ref))
        rows.append({"tensor": name, "shape": list(w.shape), "type": qtype, "numel": w.numel(),
                     "ours_1t_cpu_ms": o1_cpu, "c_1t_cpu_ms": c1_cpu, "ours_1t_ms": o1_wall, "c_1t_ms": c1_wall,
                     f"ours_{nt}t_ms": on_wall, f"c_{nt}t_ms": cn_wall, "identical": same})
        print(f"{name:30s} {str(tuple(w.shape)):14s} {qtype:5s} CPU ms: ours {o1_cpu:8.1f} C {c1_cpu:8.1f} "
              f"({o1_cpu / c1_cpu:4.2f})  wall ms: ours {nt}t {on_wall:8.1f} C 1t {c1_wall:8.1f} C {nt}t {cn_wall:8.1f}"
              f"  {'==' if same else 'DIFFERENT'}", flush=True)

    keys = ["ours_1t_cpu_ms", "c_1t_cpu_ms", "ours_1t_ms", "c_1t_ms", f"ours_{nt}t_ms", f"c_{nt}t_ms"]

    def totals(sel):
        sub = [r for r in rows if sel(r)]
        t = {"tensors": len(sub), "numel": sum(r["numel"] for r in sub)}
        t.update({k: sum(r[k] for r in sub) for k in keys})
        t["ratio_cpu_ours_over_c_1t"] = t["ours_1t_cpu_ms"] / t["c_1t_cpu_ms"]
        t[f"ratio_wall_ours_{nt}t_over_c_1t"] = t[f"ours_{nt}t_ms"] / t["c_1t_ms"]
        t[f"ratio_wall_ours_{nt}t_over_c_{nt}t"] = t[f"ours_{nt}t_ms"] / t[f"c_{nt}t_ms"]
        return t

    per_type = {t: totals(lambda r, t=t: r["type"] == t) for t in sorted({r["type"] for r in rows})}
    summary = totals(lambda r: True)
    summary["all_identical"] = all(r["identical"] for r in rows)

    print(f"\n{'type':6s} {'tensors':>7s} {'Mvalues':>8s} | {'CPU ours':>9s} {'CPU C':>9s} {'ratio':>6s} | "
          f"{f'ours {nt}t':>9s} {'C 1t':>9s} {f'C {nt}t':>9s} {'/C 1t':>6s} {f'/C {nt}t':>6s}   (ms)")
    for t, v in list(per_type.items()) + [("total", summary)]:
        print(f"{t:6s} {v['tensors']:7d} {v['numel'] / 1e6:8.1f} | {v['ours_1t_cpu_ms']:9.1f} {v['c_1t_cpu_ms']:9.1f} "
              f"{v['ratio_cpu_ours_over_c_1t']:6.2f} | {v[f'ours_{nt}t_ms']:9.1f} {v['c_1t_ms']:9.1f} "
              f"{v[f'c_{nt}t_ms']:9.1f} {v[f'ratio_wall_ours_{nt}t_over_c_1t']:6.2f} "
              f"{v[f'ratio_wall_ours_{nt}t_over_c_{nt}t']:6.2f}")
    print(f"bytes identical to llama.cpp: {summary['all_identical']}")
    if skipped:
        print(f"not timed (type not implemented here or skipped): {len(skipped)} tensors, e.g. {skipped[:3]}")

    meta = {"source": source, "ftype": args.ftype, "imatrix": args.imatrix, "threads": args.threads,
            "repeat": args.repeat, "llama_cpp_python_sdist": oracle.version, "torch": torch.__version__,
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
