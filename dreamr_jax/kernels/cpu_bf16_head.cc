// The decode head of a bf16 model on x86 CPUs with AVX512-BF16, as an XLA FFI custom call
// (cpu_bf16_head.py builds and registers it): y (M, 16 * blocks) float32 = x (M, K) bf16 times
// the table, which is held packed as (blocks, K / 2, 16, 2) bf16 bits: 16 vocabulary rows by 2
// hidden entries per 512-bit register, so one vdpbf16ps adds a hidden pair of one row of x into
// 16 outputs, with no horizontal sums. M <= 8, K even, blocks even. Two threads split the blocks.
// XLA:CPU's own bf16 GEMM (YNNPACK) runs this product at about half the speed
// (docs/BENCHMARKS.md, issue 19).
#include <immintrin.h>
#include <cstdint>
#include <thread>
#include <vector>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static void run_blocks(const uint16_t* x, const uint16_t* packed, float* y, int M, int K, int N, int b0, int b1) {
  const int KP = K / 2;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x);
  for (int b = b0; b < b1; b += 2) {
    __m512 acc0[8], acc1[8];
    for (int m = 0; m < 8; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    const uint16_t* p0 = packed + (size_t)b * KP * 32;
    const uint16_t* p1 = p0 + (size_t)KP * 32;
    for (int kp = 0; kp < KP; kp++) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(p0 + kp * 32), w1 = (__m512bh)_mm512_loadu_si512(p1 + kp * 32);
      _mm_prefetch((const char*)(p0 + kp * 32 + 1024), _MM_HINT_T0);
      _mm_prefetch((const char*)(p1 + kp * 32 + 1024), _MM_HINT_T0);
      for (int m = 0; m < M; m++) {
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)xp[m * KP + kp]);
        acc0[m] = _mm512_dpbf16_ps(acc0[m], a, w0);
        acc1[m] = _mm512_dpbf16_ps(acc1[m], a, w1);
      }
    }
    for (int m = 0; m < M; m++) {
      _mm512_storeu_ps(y + (size_t)m * N + b * 16, acc0[m]);
      _mm512_storeu_ps(y + (size_t)m * N + b * 16 + 16, acc1[m]);
    }
  }
}

static ffi::Error HeadImpl(ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::U16> packed, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto pd = packed.dimensions();
  if (xd.size() != 2 || pd.size() != 4 || pd[1] * 2 != xd[1] || pd[2] != 16 || pd[3] != 2)
    return ffi::Error::InvalidArgument("bf16 head: x (M, K) and a packed table (blocks, K / 2, 16, 2)");
  int M = xd[0], K = xd[1], blocks = pd[0], N = blocks * 16;
  if (M > 8 || K % 2 || blocks % 2) return ffi::Error::InvalidArgument("bf16 head: rows <= 8, even hidden, even blocks");
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.typed_data());
  int threads = std::thread::hardware_concurrency() >= 2 ? 2 : 1;
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; i++) {
    int b0 = (int)((long)blocks * i / threads) & ~1, b1 = i == threads - 1 ? blocks : (int)((long)blocks * (i + 1) / threads) & ~1;
    pool.emplace_back(run_blocks, xs, packed.typed_data(), y->typed_data(), M, K, N, b0, b1);
  }
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Bf16Head, HeadImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::BF16>>().Arg<ffi::Buffer<ffi::U16>>().Ret<ffi::Buffer<ffi::F32>>());
