"""Orthogonal rotations that spread activation (and weight) outliers before quantization, QuaRot-style.

Every rotation here is exact for every architecture lowbit quantizes, because it is undone where it
is applied instead of being pushed through the network:

* linear inputs: y = W x = (W Rᵀ)(R x). The weight quantizer sees W Rᵀ (formed from the merged
  weight deq(W) + s·BA, so LoRA trains as usual) and the input quantizer sees R x, computed online.
  A converted layer stores the codes of W Rᵀ and rotates its input the same way.
* attention (post-RoPE KV): queries and keys get the same R over head_dim (q·k unchanged), values
  get R and the attention output R⁻¹ (attention is linear in V), so the cached K/V are quantized
  rotated while the layer computes what it computed before.

A global residual-stream rotation folded into the weights (QuaRot / SpinQuant's R1) needs every
norm in front of a linear to become a weightless RMSNorm after folding; Gemma-2/3's post-attention
and post-feedforward norms scale the residual branch elementwise after normalizing, which does not
commute with a rotation of the stream. The online rotations above hold for Llama, Gemma, Qwen and
Mistral alike, and cost a few small matmuls per linear.

R = (Q_m ⊗ H_a ⊗ H_b ...) · diag(s) for n = m·2^k: normalized Sylvester Hadamard factors of at most
128, for an odd m > 1 a random orthogonal m×m (Gemma's 640 = 5·128), and random signs s (QuaRot's
randomized Hadamard). Applied factor by factor: n·Σ(factor sizes) multiply-adds per vector instead
of n², a Kronecker-factored fast Hadamard transform. Computed in fp32.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from lowbit.methods.qat.linear import base_linear, effective_weight, is_lora_layer

MAX_FACTOR = 128


@functools.lru_cache(maxsize=None)
def _hadamard(size: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    while h.shape[0] < size:
        h = torch.kron(h, base)
    return (h / math.sqrt(size)).to(device)


def hadamard(size: int, device="cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (size a power of two): symmetric and orthogonal."""
    if size & (size - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {size}")
    return _hadamard(size, str(device))


def factor_sizes(n: int) -> tuple[int, list[int]]:
    """(odd part m, power-of-two factors ≤ MAX_FACTOR, balanced) with m · prod(factors) = n."""
    k = (n & -n).bit_length() - 1
    m = n >> k
    parts = max(1, math.ceil(k / int(math.log2(MAX_FACTOR)))) if k else 0
    bits = [k // parts + (i < k % parts) for i in range(parts)]
    return m, [1 << b for b in bits]


def random_orthogonal(m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: Haar-distributed


class Rotation(nn.Module):
    """x ↦ R x over the last dimension (`rotate(x, inverse=True)`: Rᵀ x). Signs and the odd factor are
    buffers, so a saved model holds the exact rotation it was trained with.

    Sibling linears that read the same tensor (q/k/v, gate/up) share one Rotation, and calling it
    (`forward`) on the tensor it saw last returns the result it computed then: R x once per input."""

    def __init__(self, n: int, generator: torch.Generator | None = None):
        super().__init__()
        self.n = n
        m, self.pow2 = factor_sizes(n)
        signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        self.register_buffer("signs", signs)
        self.register_buffer("odd", random_orthogonal(m, generator) if m > 1 else torch.ones(1, 1))
        self._last = None

    def _factors(self, device) -> list[torch.Tensor]:
        mats = [hadamard(s, device) for s in self.pow2]
        return ([self.odd] if self.odd.shape[0] > 1 else []) + mats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x._version, torch.is_grad_enabled())
        last = self._last
        if last is not None and last[0] is x and last[1] == key:
            return last[2]
        y = self.rotate(x)
        self._last = (x, key, y)
        return y

    def rotate(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a tensor of shape {tuple(x.shape)}")
        y = x.float()
        if not inverse:
            y = y * self.signs
        rows = y.numel() // self.n
        # (A ⊗ B ⊗ C) x on [rows, a, b, c]: C on the last axis as one GEMM, then that axis moves to the front
        # (a cyclic shift); after every factor the axes are back in order
        for mat in reversed(self._factors(y.device)):
            f = mat.shape[0]
            y = (y.reshape(-1, f) @ (mat if inverse else mat.t())).reshape(rows, self.n // f, f).transpose(1, 2)
        y = y.reshape(x.shape)
        if inverse:
            y = y * self.signs
        return y.to(x.dtype)

    def layer_weight(self, layer: nn.Module) -> torch.Tensor:
        """W·Rᵀ in fp32 for a (QAT) linear: the effective weight deq(W) + Σ s·B@A, rotated. With a frozen
        plain base weight, W·Rᵀ is computed once and each adapter adds s·B@(A·Rᵀ) (rank r, cheap)."""
        base = base_linear(layer)
        w0 = getattr(base, "weight", None)
        lora = is_lora_layer(layer) and not layer.disable_adapters and not layer.merged
        if not lora or not isinstance(w0, nn.Parameter) or w0.requires_grad or hasattr(base, "dequantize"):
            return self.rotate(effective_weight(layer))
        key = (w0.data_ptr(), w0._version, w0.device, id(self))
        cached = layer.__dict__.get("_lowbit_rotated_base")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.rotate(w0.float()))
            layer.__dict__["_lowbit_rotated_base"] = cached
        w = cached[1]
        for name in layer.active_adapters:
            if name in layer.lora_A:
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                w = w + (b.float() @ self.rotate(a.float())) * layer.scaling[name]
        return w

    def matrix(self) -> torch.Tensor:
        """The dense n×n R (tests, inspection)."""
        return self.rotate(torch.eye(self.n)).t()

    def extra_repr(self) -> str:
        m = self.odd.shape[0]
        factors = ([f"Q{m}"] if m > 1 else []) + [f"H{s}" for s in self.pow2]
        return f"n={self.n}: {' ⊗ '.join(factors)} · signs"


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a QAT linear quantizes: W·Rᵀ when its input is rotated, else the effective weight."""
    rot = getattr(layer, "lowbit_rotation", None)
    return effective_weight(layer) if rot is None else rot.layer_weight(layer)


def head_dim(module: nn.Module) -> int:
    cfg = module.config
    return getattr(module, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def install_kv(model: nn.Module, attention_modules, generator: torch.Generator | None = None) -> int:
    """One head_dim rotation per attention module (queries, keys, values; the output rotated back)."""
    for _, m in attention_modules:
        m.lowbit_kv_rotation = Rotation(head_dim(m), generator).to(next(m.parameters()).device)
    return len(attention_modules)


def uninstall_kv(attention_modules) -> None:
    for _, m in attention_modules:
        if hasattr(m, "lowbit_kv_rotation"):
            delattr(m, "lowbit_kv_rotation")
