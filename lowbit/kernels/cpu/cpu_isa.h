// The CPU kernels' vector paths and their choice at run time, shared by the NF4 and GGUF glue so
// that one LOWBIT_CPU_ISA value means one path for both.
#pragma once
#include <cstdlib>
#include <cstring>

namespace lowbit_cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline const char* isa_name(Isa i) {
  return i == Isa::Avx512 ? "avx512" : i == Isa::Avx2 ? "avx2" : "scalar";
}

// AVX-512 F/BW/VL/DQ + BF16 (Sapphire Rapids, Zen 4 and later), else AVX2 + FMA + F16C, else scalar.
inline Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Scalar;
}

enum class IsaRequest { Best, Chosen, Unknown, Unsupported };

// LOWBIT_CPU_ISA read against `best`: the path to use and what the request was (callers warn).
inline Isa requested_isa(Isa best, IsaRequest* why) {
  const char* env = std::getenv("LOWBIT_CPU_ISA");
  *why = IsaRequest::Best;
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  Isa want;
  if (std::strcmp(env, "avx512") == 0) want = Isa::Avx512;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::Avx2;
  else if (std::strcmp(env, "scalar") == 0) want = Isa::Scalar;
  else { *why = IsaRequest::Unknown; return best; }
  if (static_cast<int>(want) > static_cast<int>(best)) { *why = IsaRequest::Unsupported; return best; }
  *why = IsaRequest::Chosen;
  return want;
}

}  // namespace lowbit_cpu
