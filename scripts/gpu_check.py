"""GPU check: lowbit's CUDA ops vs the reference vs bitsandbytes (parity, then timing), one JSON + a table.

Run by scripts/gpu_check.sh on a machine with a CUDA GPU. Parity: every `lowbit::` op on CUDA (our extension
when it built, else bitsandbytes' kernels) against the pure-torch reference, bit for bit where the math is
exact (dequantize, quantize) and within fp32 summation error for the matmuls. Timing: dequantize and the M=1
GEMV on a 4096x4096 NF4 double-quant weight, ours vs bitsandbytes vs dense, CUDA events, median of 50.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def _ms(fn, repeats=50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def parity() -> dict:
    from lowbit import kernels
    from lowbit.format import quantize
    from lowbit.kernels import ops
    from lowbit.kernels.ops import state_args
    out = {}
    for qt in ("nf4", "fp4"):
        for dq in (True, False):
            w = torch.randn(1024, 2048)
            q = quantize(w, 64, dq, qt).to("cuda")
            args = state_args(q)
            cpu_args = [a.cpu() if torch.is_tensor(a) else a for a in args]
            ref = ops._dequantize_ref(*cpu_args, torch.float32)
            x = torch.randn(1, 2048, device="cuda")
            gemv = kernels.matmul_4bit(x, q).cpu()
            qq = kernels.quantize_4bit(w.cuda(), 64, dq, qt)
            row = {"gemv_max_abs_diff": (gemv - x.cpu() @ ref.t()).abs().max().item(),
                   "quantize_equal": bool(torch.equal(qq.packed.cpu().view(-1), quantize(w, 64, dq, qt).packed.view(-1)))}
            for dt in (torch.float32, torch.bfloat16, torch.float16):  # every output dtype the kernels write
                got = kernels.dequantize_4bit(q, dt).cpu()
                row[f"dequantize_equal_{str(dt).removeprefix('torch.')}"] = bool(
                    torch.equal(got, ops._dequantize_ref(*cpu_args, dt)))
            out[f"{qt}{'+dq' if dq else ''}"] = row
    return out


def timing() -> dict:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from lowbit import kernels
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q = kernels.quantize_4bit(w, 64, True, "nf4")
    bp, bs = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    return {"dequant_bf16_lowbit_ms": _ms(lambda: kernels.dequantize_4bit(q, torch.bfloat16)),
            "dequant_bf16_bnb_ms": _ms(lambda: dequantize_4bit(bp, bs)),
            "gemv_m1_lowbit_ms": _ms(lambda: kernels.matmul_4bit(x, q)),
            "gemv_m1_bnb_ms": _ms(lambda: bnb.matmul_4bit(x, bp.t(), bs)),
            "gemv_m1_dense_ms": _ms(lambda: torch.nn.functional.linear(x, w))}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    from lowbit.kernels import ensure_backends
    backends = ensure_backends()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "backends": backends,
              "parity": parity(), "timing": timing()}
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"| check | value |\n|---|---|\n| device | {result['device']} |\n| CUDA backend | {backends.get('cuda')} |")
    for k, v in result["parity"].items():
        print(f"| parity {k} | {v} |")
    for k, v in result["timing"].items():
        print(f"| {k} | {v:.4f} |")
    ok = all(v["quantize_equal"] and v["gemv_max_abs_diff"] < 1e-3 and all(e for k, e in v.items() if
             k.startswith("dequantize_equal")) for v in result["parity"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
