"""Run Python in a fresh process with a chosen CPU kernel path: the ISA is fixed once per process."""
from __future__ import annotations

import os
import subprocess
import sys


def run_python(script: str | None = None, code: str | None = None, isa: str | None = None,
               kernels: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python script` (or `python -c code`) with LOWBIT_CPU_ISA / LOWBIT_KERNELS set as given (unset otherwise);
    asserts it exits 0 and shows the end of its stderr when it does not."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOWBIT_KERNELS", "LOWBIT_CPU_ISA")}
    if isa is not None:
        env["LOWBIT_CPU_ISA"] = isa
    if kernels is not None:
        env["LOWBIT_KERNELS"] = kernels
    cmd = [sys.executable, "-c", code] if code is not None else [sys.executable, script]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p
