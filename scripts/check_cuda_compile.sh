#!/usr/bin/env bash
# Compile every CUDA source with nvcc for sm_80, sm_86, sm_89 and sm_90; any error fails.
# (The torch binding, nf4_cuda_ops.cpp, needs CUDA torch headers and is built at run time.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for cu in lowbit/kernels/cuda/*.cu; do
  for sm in 80 86 89 90; do
    nvcc -std=c++17 -O3 -c "$cu" -o "$out/$(basename "$cu" .cu)_sm$sm.o" \
      -gencode "arch=compute_$sm,code=sm_$sm" -Ilowbit/kernels/cuda
    echo "nvcc ok: $cu sm_$sm"
  done
done
