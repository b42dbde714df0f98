#!/usr/bin/env bash
# Compile every CUDA source with nvcc for sm_80, sm_86, sm_89 and sm_90; any error fails.
# With the flags torch.utils.cpp_extension adds to every nvcc command (no implicit half/bf16
# conversions), so what passes here also compiles inside the extension build.
# (The torch binding, nf4_cuda_ops.cpp, needs a CUDA torch: scripts/check_cuda_binding.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
torch_flags=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
             -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
for cu in lowbit/kernels/cuda/*.cu; do
  for sm in 80 86 89 90; do
    nvcc -std=c++17 -O3 -c "$cu" -o "$out/$(basename "$cu" .cu)_sm$sm.o" \
      -gencode "arch=compute_$sm,code=sm_$sm" -Ilowbit/kernels/cuda "${torch_flags[@]}"
    echo "nvcc ok: $cu sm_$sm"
  done
done
