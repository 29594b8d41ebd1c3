/* How fast can this CPU run the batch-8 bf16 head (8 x 151936 x 512) of bench_vllm.py's model?
 *
 * A measurement, not part of the package: YNNPACK (through XLA) takes 6.8-7.7 ms for this product
 * and oneDNN (torch F.linear, vLLM's path) 6.8 ms, about 180 GFLOP/s and 22 GB/s. This loop holds
 * the table packed for AVX512-BF16, 16 vocabulary rows by 2 hidden entries per 512-bit register,
 * so each `vdpbf16ps` adds one hidden pair of one row of x into 16 outputs at once, with no
 * horizontal sums. It is what an XLA FFI custom call for the decode head would run
 * (docs/BENCHMARKS.md, issue 19's section). Its result is checked against a scalar float64 sum.
 *
 *   gcc -O3 -mavx512f -mavx512bw -mavx512bf16 -pthread -o /tmp/bf16_head scripts/bf16_head_kernel.c
 *   /tmp/bf16_head 2        # threads
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROWS = 8, VOCAB = 151936, HIDDEN = 512, PAIRS = HIDDEN / 2, BLOCKS = VOCAB / 16 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

typedef struct {
  const uint32_t *x;      /* (ROWS, PAIRS): each uint32 is one bf16 pair of a hidden row */
  const uint16_t *packed; /* (BLOCKS, PAIRS, 16, 2) */
  float *y;               /* (ROWS, VOCAB) */
  int first_block, end_block;
} Job;

static void *run(void *arg) {
  const Job *job = arg;
  for (int b = job->first_block; b < job->end_block; b += 2) { /* two 16-wide blocks: 16 accumulators */
    __m512 acc0[ROWS], acc1[ROWS];
    for (int m = 0; m < ROWS; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    const uint16_t *p0 = job->packed + (size_t)b * PAIRS * 32, *p1 = p0 + (size_t)PAIRS * 32;
    for (int kp = 0; kp < PAIRS; kp++) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(p0 + kp * 32), w1 = (__m512bh)_mm512_loadu_si512(p1 + kp * 32);
      _mm_prefetch((const char *)(p0 + kp * 32 + 1024), _MM_HINT_T0);
      _mm_prefetch((const char *)(p1 + kp * 32 + 1024), _MM_HINT_T0);
      for (int m = 0; m < ROWS; m++) {
        __m512bh a = (__m512bh)_mm512_set1_epi32((int)job->x[m * PAIRS + kp]);
        acc0[m] = _mm512_dpbf16_ps(acc0[m], a, w0);
        acc1[m] = _mm512_dpbf16_ps(acc1[m], a, w1);
      }
    }
    for (int m = 0; m < ROWS; m++) {
      _mm512_storeu_ps(job->y + (size_t)m * VOCAB + b * 16, acc0[m]);
      _mm512_storeu_ps(job->y + (size_t)m * VOCAB + b * 16 + 16, acc1[m]);
    }
  }
  return NULL;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  if (threads < 1 || threads > 64) threads = 2;
  uint16_t *x = aligned_alloc(64, ROWS * HIDDEN * 2), *table = aligned_alloc(64, (size_t)VOCAB * HIDDEN * 2);
  uint16_t *packed = aligned_alloc(64, (size_t)VOCAB * HIDDEN * 2);
  float *y = aligned_alloc(64, (size_t)ROWS * VOCAB * 4);
  srand(0);
  for (size_t i = 0; i < (size_t)VOCAB * HIDDEN; i++) table[i] = (uint16_t)((rand() & 1 ? 0x8000 : 0) + 0x3a00 + rand() % 2048); /* +-0.0005-0.03 */
  for (int i = 0; i < ROWS * HIDDEN; i++) x[i] = (uint16_t)((rand() & 1 ? 0x8000 : 0) + 0x3e00 + rand() % 1024); /* +-0.125-2 */
  for (int b = 0; b < BLOCKS; b++)
    for (int kp = 0; kp < PAIRS; kp++)
      for (int lane = 0; lane < 16; lane++)
        for (int t = 0; t < 2; t++)
          packed[(((size_t)b * PAIRS + kp) * 16 + lane) * 2 + t] = table[(size_t)(b * 16 + lane) * HIDDEN + kp * 2 + t];
  double best = 1e9, total = 0;
  const int repeats = 20;
  for (int r = 0; r < repeats; r++) {
    pthread_t th[64];
    Job jobs[64];
    double t0 = now();
    for (int i = 0; i < threads; i++) {
      int first = (int)((long)BLOCKS * i / threads) & ~1, end = i == threads - 1 ? BLOCKS : (int)((long)BLOCKS * (i + 1) / threads) & ~1;
      jobs[i] = (Job){(const uint32_t *)x, packed, y, first, end};
      pthread_create(&th[i], NULL, run, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    double dt = now() - t0;
    total += dt;
    if (dt < best) best = dt;
  }
  double worst_rel = 0;
  for (int s = 0; s < 64; s++) {
    int m = s % ROWS, n = (int)(((long)s * 2654435761u) % VOCAB);
    double ref = 0, scale = 0;
    for (int k = 0; k < HIDDEN; k++) {
      double p = (double)bf16_to_float(x[m * HIDDEN + k]) * bf16_to_float(table[(size_t)n * HIDDEN + k]);
      ref += p;
      scale += fabs(p);
    }
    double rel = fabs(y[(size_t)m * VOCAB + n] - ref) / scale;
    if (rel > worst_rel) worst_rel = rel;
  }
  printf("threads %d: best %.2f ms, mean %.2f ms over %d calls (%.1f GB/s of table, %.1f GFLOP/s); "
         "worst error / sum|products| over 64 outputs %.1e\n",
         threads, best * 1e3, total / repeats * 1e3, repeats, (double)VOCAB * HIDDEN * 2 / best / 1e9,
         2.0 * ROWS * VOCAB * HIDDEN / best / 1e9, worst_rel);
  return worst_rel < 1e-5 ? 0 : 1;
}
