"""compute_dtype: auto picks bf16 only where bf16 matmuls are fast."""
import torch

from lowbit.models.load import as_dtype
from lowbit.utils import device


def test_auto_follows_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert as_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert as_dtype("auto") == torch.float32


def test_flag_detection_reads_cpuinfo():
    flags = open("/proc/cpuinfo").read()
    device.cpu_has_fast_bf16.cache_clear()
    assert device.cpu_has_fast_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
