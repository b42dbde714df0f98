#!/usr/bin/env bash
# Compile and link lowbit's CUDA extension (nf4_kernels.cu + the torch binding nf4_cuda_ops.cpp)
# against a CUDA build of torch, through the build path lowbit uses at run time
# (lowbit.kernels.cuda.build.compile_extension), then load the .so in a fresh process with
# torch.ops.load_library (no GPU needed) and check that every op of the catalog
# (lowbit/kernels/ops.py) has a kernel from nf4_cuda_ops.cpp for the CUDA dispatch key whose
# C++ signature matches the op's schema. One summary line; non-zero exit on any failure.
#
# Not in CI (a CUDA torch is ~5.5 GB). Here, with nvcc but no GPU:
#   python3 -m venv /tmp/cudatorch && /tmp/cudatorch/bin/pip install torch==2.14.1
#   bash scripts/check_cuda_binding.sh
# Knobs: LOWBIT_CUDA_PYTHON (a python whose torch has CUDA; default /tmp/cudatorch/bin/python),
# TORCH_CUDA_ARCH_LIST (default 8.0;9.0 without a GPU; with one, torch's default: the visible
# GPUs, as at run time), LOWBIT_CUDA_BUILD_DIR (default: the run-time cache directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LOWBIT_CUDA_PYTHON:-/tmp/cudatorch/bin/python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "check_cuda_binding: FAIL: $PY has no CUDA torch; install one: python3 -m venv /tmp/cudatorch &&" \
       "/tmp/cudatorch/bin/pip install torch==2.14.1 (or set LOWBIT_CUDA_PYTHON)"
  exit 2
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
  echo "check_cuda_binding: FAIL: nvcc not found: install the CUDA toolkit or set CUDA_HOME"
  exit 2
fi
# torch takes CUDA_HOME as nvcc's ../.. without following wrapper scripts; where that has no
# cuda_runtime.h (nvcc a wrapper script in /usr/local/bin), ask nvcc where its toolkit is.
if [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ]; then
  guess=$(dirname "$(dirname "$(command -v nvcc)")")
  if [ ! -f "$guess/include/cuda_runtime.h" ]; then
    top=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    if [ -n "$top" ]; then export CUDA_HOME=$(cd "$top" && pwd); fi  # TOP is <toolkit>/bin/..
  fi
fi
if [ -z "${TORCH_CUDA_ARCH_LIST+x}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    2>/dev/null; then
  export TORCH_CUDA_ARCH_LIST="8.0;9.0"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
# 1) build (compile_extension also loads it: a link error or a schema clash fails here)
if ! "$PY" - >"$log" 2>&1 <<'EOF'
import os
import sys

from lowbit.kernels.cuda import build

so = build.compile_extension(os.environ.get("LOWBIT_CUDA_BUILD_DIR") or None, verbose=True)
print(f"SO={so}", file=sys.stderr)
EOF
then
  # compiler errors, or torch's own schema check (a mismatch aborts the loading process)
  grep -E -A2 "error|FAILED|reason:" "$log" | head -n 40 || true
  detail=$(grep -E -m3 "error:|operator:|reason:" "$log" | sed 's/^ *//' | tr '\n' ' ' | cut -c1-300 || true)
  echo "check_cuda_binding: FAIL: the extension did not build or load: ${detail:-$(tail -n 1 "$log" | cut -c1-200)}"
  exit 1
fi
so=$(sed -n 's/^SO=//p' "$log" | tail -1)
built=$(( $(date +%s) - start ))
# 2) a fresh process: load the .so, check every op's CUDA kernel and its signature
LOWBIT_SO="$so" LOWBIT_BUILT_S="$built" "$PY" - <<'EOF'
import os
import re
import sys

import torch

# the kernels first, then the catalog: a kernel that does not fit its schema then fails the
# define with a message here, not std::terminate inside dlopen as in the other order
so = os.environ["LOWBIT_SO"]
torch.ops.load_library(so)
try:
    from lowbit.kernels import ops
except RuntimeError as e:
    reason = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip().startswith(("operator:", "reason:")))
    print(f"check_cuda_binding: FAIL: the op catalog rejects a CUDA kernel: {reason or str(e).splitlines()[0]}")
    sys.exit(1)


def types(schema):
    return [str(a.type) for a in schema.arguments], [str(r.type) for r in schema.returns]


problems = []
for name in ops.SCHEMAS:
    op = f"lowbit::{name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"):
        problems.append(f"{name}: no CUDA kernel")
        continue
    line = next((ln for ln in torch._C._dispatch_dump(op).splitlines() if ln.startswith("CUDA:")), "")
    m = re.match(r"CUDA: registered at (\S+):\d+ :: (\(.*\) -> .*?) \[", line)
    if m is None or not m.group(1).endswith("nf4_cuda_ops.cpp"):
        problems.append(f"{name}: CUDA kernel not from nf4_cuda_ops.cpp ({line.strip()[:120]})")
        continue
    want, got = types(torch._C._get_schema(op, "")), types(torch._C.parse_schema(f"kernel{m.group(2)}"))
    if want != got:
        problems.append(f"{name}: kernel signature {got} != schema {want}")

tag = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'native')}, "
       f"built in {os.environ['LOWBIT_BUILT_S']} s")
if problems:
    print(f"check_cuda_binding: FAIL ({tag}): " + "; ".join(problems))
    sys.exit(1)
print(f"check_cuda_binding: OK: {len(ops.SCHEMAS)}/{len(ops.SCHEMAS)} lowbit ops have a CUDA kernel from "
      f"nf4_cuda_ops.cpp matching their schemas ({tag}): {so}")
EOF
