// torch glue of the GGUF quantizers: torch.ops.lowbit_cpu.ggml_quantize(x, qtype, quant_weights)
// -> (rows, row_bytes) uint8, the bytes of llama.cpp's quantize_<type>(src, dst, nrow, n,
// quant_weights). Argument checks, the ISA choice, and the split over threads (chunks of
// blocks of the flattened tensor: blocks are independent). Kernels: ggml_quant_body.h.
//
// ISA: like the NF4 kernels (nf4_cpu.cpp) and with the same names, the best the CPU has or
// LOWBIT_CPU_ISA=avx512|avx2|scalar, fixed on first use; ggml_isa() says which one runs.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include "cpu_isa.h"
#include "ggml_quant.h"

namespace {

using namespace lowbit_ggml;

using lowbit_cpu::Isa;

Isa active_isa() {  // the NF4 glue warns about an unknown or unsupported LOWBIT_CPU_ISA
  static const Isa isa = [] {
    lowbit_cpu::IsaRequest why;
    return lowbit_cpu::requested_isa(lowbit_cpu::best_isa(), &why);
  }();
  return isa;
}

std::string ggml_isa_op() {
  return lowbit_cpu::isa_name(active_isa());
}

int type_of(c10::string_view s) {
  static const char* names[] = {"Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"};
  for (int t = 0; t < 6; ++t)
    if (s == names[t]) return t;
  TORCH_CHECK_VALUE(false, "ggml_quantize: unsupported type ", std::string(s), "; supported: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K");
}

at::Tensor ggml_quantize_cpu(const at::Tensor& x_in, c10::string_view qtype, const c10::optional<at::Tensor>& qw_in) {
  const int type = type_of(qtype);
  TORCH_CHECK_VALUE(x_in.dim() == 2, "ggml_quantize: x must be 2-D (rows, n), got ", x_in.dim(), "-D");
  TORCH_CHECK_VALUE(x_in.device().is_cpu(), "ggml_quantize: x must be on the CPU");
  const auto st = x_in.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                    "ggml_quantize: x must be float32, bfloat16 or float16, got ", st);
  auto x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1), ue = unit_elems(type);
  TORCH_CHECK_VALUE(n % ue == 0, "ggml_quantize: ", std::string(qtype), " needs rows of a multiple of ", ue,
                    " values, got ", n);
  auto out = at::empty({rows, n / ue * unit_bytes(type)}, x.options().dtype(at::kByte));
  if (rows == 0 || n == 0) return out;
  Job j;
  j.x = x.data_ptr();
  j.kind = st == at::kFloat ? F32 : st == at::kBFloat16 ? BF16 : F16;
  j.type = type;
  j.rows = rows;
  j.n = n;
  j.out = out.data_ptr<uint8_t>();
  at::Tensor qw, sigma2;
  if (qw_in.has_value() && type != Q8_0) {  // quantize_q8_0 ignores quant_weights
    qw = qw_in->to(at::kFloat).contiguous();
    if (qw.dim() == 1) qw = qw.unsqueeze(0);
    TORCH_CHECK_VALUE(qw.dim() == 2 && qw.size(1) == n && qw.size(0) > 0 && rows % qw.size(0) == 0,
                      "ggml_quantize: quant_weights of shape ", qw.sizes(), " do not fit ", rows, " rows of ", n);
    j.qw = qw.data_ptr<float>();
    j.qw_groups = qw.size(0);
  }
  const Isa isa = active_isa();
  std::atomic<bool> bad{false};
  if (j.qw && (type == Q4_0 || type == Q5_0)) {
    sigma2 = at::empty({rows}, x.options().dtype(at::kFloat));
    float* s2 = sigma2.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(16, (int64_t(1) << 19) / n), [&](int64_t r0, int64_t r1) {
      const bool b = isa == Isa::Avx512 ? row_sigma2_avx512(j, r0, r1, s2)
                     : isa == Isa::Avx2 ? row_sigma2_avx2(j, r0, r1, s2)
                                        : row_sigma2_scalar(j, r0, r1, s2);
      if (b) bad = true;
    });
    j.row_sigma2 = s2;
  }
  const int64_t units = rows * (n / ue);
  // grain: whole kernel chunks (16 super-blocks / 128 blocks), and 1-2 ms of work per thread:
  // waking a second thread for less saves little, and on busy cores it can cost a time slice
  const bool cheap = !j.qw && type < Q4_K;  // element-wise, ~1 ns a value; the searches cost 5-15
  const int64_t min_values = cheap ? (int64_t(1) << 21) : (int64_t(1) << 17);
  const int64_t grain = std::max<int64_t>(type >= Q4_K ? 16 : 128, min_values / ue);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const bool b = isa == Isa::Avx512 ? quantize_units_avx512(j, u0, u1)
                   : isa == Isa::Avx2 ? quantize_units_avx2(j, u0, u1)
                                      : quantize_units_scalar(j, u0, u1);
    if (b) bad = true;
  });
  TORCH_CHECK_VALUE(!bad.load(), "ggml quantization needs finite values (found inf/nan)");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("ggml_isa() -> str", &ggml_isa_op);
  m.def("ggml_quantize(Tensor x, str qtype, Tensor? quant_weights) -> Tensor", &ggml_quantize_cpu);
}
