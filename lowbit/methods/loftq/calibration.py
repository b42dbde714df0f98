"""Calibration for activation-aware LoftQ: input second moments H = XᵀX/n of each adapted Linear.

Plain LoftQ minimises ‖W − Q − sBA‖_F, but NF4 noise is close to white, so a rank-r term
captures little of it. What the network feels is the output error ‖X(W − Q − sBA)ᵀ‖_F =
‖(W − Q − sBA)·H^{1/2}‖_F, and LLM activations are very anisotropic (a few channels carry
most of the energy), so in that metric the error *is* concentrated in a few directions.
The rank-r step becomes an SVD of (W − Q)·H^{1/2}, un-whitened by H^{-1/2} (CLoQ,
arXiv 2501.18475). H is collected with forward hooks from a few calibration windows run
through the 4-bit model itself, so no dense copy of the model is ever held.

The windows come from a text file or, for data-free LoftQ, from token sequences the
full-precision model wrote itself (`TokenSequences`: e.g. `lowbit generate` output, read by the
recipe layer — this package does not depend on data_gen).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError, InputError


@dataclass
class TokenSequences:
    """Already-tokenized calibration sequences (each with the BOS its writer was conditioned on, if any),
    e.g. a model's own generations: data-free calibration. `name` is what the LoftQ record shows."""

    sequences: list[list[int]]
    name: str

    def __str__(self) -> str:
        return self.name

    def windows(self, n_samples: int, seq_len: int) -> torch.Tensor:
        """`n_samples` sequences evenly spaced over those at least `seq_len` long, cut to `seq_len` tokens."""
        if n_samples < 1 or seq_len < 2:
            raise ConfigError(f"LoftQ calibration needs samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
        long = [s for s in self.sequences if len(s) >= seq_len]
        if len(long) < n_samples:
            raise InputError(f"LoftQ calibration source {self.name} has {len(long)} sequences of >= {seq_len} tokens, "
                             f"{n_samples} are asked for; lower lora.loftq.calibration_samples or "
                             "calibration_seq_len, or generate more (longer) sequences")
        # evenly spaced rather than the first n: generation order can follow the first-token schedule
        picks = torch.linspace(0, len(long) - 1, n_samples).round().long().tolist()
        return torch.tensor([long[i][:seq_len] for i in picks])


def calibration_batches(tok, path, n_samples: int = 64, seq_len: int = 256) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens (BOS first), evenly spaced over a UTF-8 text file
    (or taken from `TokenSequences`)."""
    if isinstance(path, TokenSequences):
        return path.windows(n_samples, seq_len)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"LoftQ calibration file {p} does not exist; point lora.loftq.calibration at a text file "
                         "(e.g. the training text) or remove it for weight-space LoftQ")
    if n_samples < 1 or seq_len < 2:
        raise ConfigError(f"LoftQ calibration needs samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    ids = tok(p.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    body = seq_len - 1 if tok.bos_token_id is not None else seq_len
    if len(ids) < body:
        raise InputError(f"LoftQ calibration file {p} has {len(ids)} tokens, fewer than one window of {body}; "
                         "use a longer text or lower lora.loftq.calibration_seq_len")
    # evenly spaced starts: overlapping windows when the text is short rather than repeating one
    starts = torch.linspace(0, len(ids) - body, n_samples).round().long().tolist()
    x = torch.tensor([ids[s:s + body] for s in starts])
    if tok.bos_token_id is not None:
        x = torch.cat([torch.full((n_samples, 1), tok.bos_token_id), x], 1)
    return x


@torch.no_grad()
def input_moments(model: nn.Module, batches: torch.Tensor, names, batch_size: int = 8,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """name → H = XᵀX / n (fp32, in×in) of the input to each module in `names`.

    Modules fed the very same tensor (q/k/v, gate/up) share one H object. Only the decoder
    runs (no vocabulary projection: it is the largest matmul and feeds no target).
    """
    from tqdm.auto import tqdm
    names = set(names)
    acc: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    alias: dict[str, str] = {}
    seen: dict[int, tuple] = {}  # id(input) -> (weakref, leader) for the current batch

    def hook(name):
        def f(mod, args):
            x = args[0]
            hit = seen.get(id(x))
            if hit is not None and hit[0]() is x:  # weakref check: ids of freed tensors get reused
                alias[name] = hit[1]
                return
            seen[id(x)] = (weakref.ref(x), name)
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            h = x2.T @ x2
            acc[name] = acc[name].add_(h) if name in acc else h
            count[name] = count.get(name, 0) + x2.shape[0]
        return f

    mods = {n: m for n, m in model.named_modules() if n in names}
    missing = names - set(mods)
    if missing:
        raise ConfigError(f"calibration targets not in the model: {sorted(missing)[:3]}")
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(batches), batch_size), desc="LoftQ calibration", unit="batch",
                      disable=not progress):
            seen.clear()
            decoder(input_ids=batches[i:i + batch_size].to(_device(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {n: acc[n].div_(count[n]) for n in acc}
    for n, leader in alias.items():
        out[n] = out[leader]
    never = names - set(out)
    if never:
        raise ConfigError(f"calibration forward never reached {sorted(never)[:3]}; these layers cannot be calibrated")
    return out


@contextmanager
def lapack_threads(device: torch.device | str = "cpu", n: int = 1):
    """Run CPU decompositions (svd, eigh, qr) on `n` threads.

    MKL's multi-threaded LAPACK spin-waits at barriers: on this 2-core machine with any other
    load, a 512x2048 SVD took 25 s on 2 threads and 1.0 s on 1 (eigh 1024²: 27 s vs 0.5 s).
    """
    if torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass
class Whitening:
    """R = (H + λI)^{1/2} and R⁻¹ for one input: ‖E·R‖_F is the output error of a weight error E."""

    sqrt: torch.Tensor
    inv_sqrt: torch.Tensor


def whitening(H: torch.Tensor, damp: float = 0.01) -> Whitening:
    """Symmetric square root of H damped by `damp`·mean(diag H) (keeps R⁻¹ bounded for unused channels)."""
    if not damp > 0:
        raise ConfigError(f"LoftQ calibration damp must be > 0 (it keeps H invertible), got {damp}")
    H = H.double()
    lam = damp * H.diagonal().mean().clamp_min(1e-12)
    with lapack_threads(H.device):
        evals, evecs = torch.linalg.eigh(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
    evals = evals.clamp_min(lam)
    sqrt = (evecs * evals.sqrt()) @ evecs.T
    inv = (evecs * evals.rsqrt()) @ evecs.T
    return Whitening(sqrt.float(), inv.float())
