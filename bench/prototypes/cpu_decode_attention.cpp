// PROTOTYPE, not used by the runtime: decode attention on CPU with AVX-512 (few query rows, every key
// visible, fp32, head_dim a multiple of 16 up to 256). One pass over K and V per (KV head, key range)
// work item: a block of BLOCK keys' scores for all query rows, an online softmax (Sleef's exp, the one
// libtorch_cpu exports), then the V rows accumulated; the key ranges merged by their max and sum.
// Built and timed by bench/cpu_attention_prototype.py against torch's SDPA and the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>
#include <algorithm>

#ifndef __AVX512F__
#error "this prototype needs AVX-512 (compiled with -march=native)"
#endif

extern "C" __m512 Sleef_expf16_u10(__m512);

namespace {
constexpr int64_t BLOCK = 64;  // keys per block
constexpr int64_t MAX_ROWS = 128;  // query rows (G * T) per KV head

inline float dot(const float* a, const float* b, int64_t D) {  // D a multiple of 16
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), s1);
  }
  if (d < D) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), s0);
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

inline void axpy(float p, const float* x, float* y, int64_t D) {  // y += p * x
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t d = 0; d < D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
}

void attend_range(const float* q, int64_t M, int64_t D, const float* k, int64_t ks, const float* v, int64_t vs,
                  int64_t lo, int64_t hi, float scale, float* m_out, float* l_out, float* acc) {
  alignas(64) float s[MAX_ROWS * BLOCK];
  for (int64_t m = 0; m < M; ++m) { m_out[m] = -INFINITY; l_out[m] = 0.f; }
  std::fill(acc, acc + M * D, 0.f);
  for (int64_t b = lo; b < hi; b += BLOCK) {
    const int64_t n = std::min(BLOCK, hi - b);
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = k + (b + j) * ks;
      _mm_prefetch(reinterpret_cast<const char*>(kj + 8 * ks), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) s[m * BLOCK + j] = dot(q + m * D, kj, D) * scale;
    }
    for (int64_t m = 0; m < M; ++m) {
      float* sm = s + m * BLOCK;
      for (int64_t j = n; j < BLOCK; ++j) sm[j] = -INFINITY;
      __m512 mx = _mm512_set1_ps(m_out[m]);
      for (int64_t j = 0; j < BLOCK; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(sm + j));
      const float mnew = _mm512_reduce_max_ps(mx);
      const __m512 mv = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < BLOCK; j += 16) {
        __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_load_ps(sm + j), mv));
        _mm512_store_ps(sm + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      const float corr = std::exp(m_out[m] - mnew);
      l_out[m] = l_out[m] * corr + _mm512_reduce_add_ps(sum);
      m_out[m] = mnew;
      if (corr != 1.f) {
        const __m512 c = _mm512_set1_ps(corr);
        float* am = acc + m * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(am + d, _mm512_mul_ps(c, _mm512_loadu_ps(am + d)));
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + (b + j) * vs;
      _mm_prefetch(reinterpret_cast<const char*>(vj + 8 * vs), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) axpy(s[m * BLOCK + j], vj, acc + m * D, D);
    }
  }
}
}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t splits) {
  const int64_t H = q.size(0), M = q.size(1), D = q.size(2), L = k.size(1);
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "fp32 only");
  TORCH_CHECK(D % 16 == 0 && D <= 256 && M <= MAX_ROWS, "head_dim a multiple of 16 up to 256, at most 128 query rows");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "K and V rows contiguous");
  q = q.contiguous();
  auto out = torch::empty_like(q);
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  splits = std::max<int64_t>(1, std::min(splits, (L + BLOCK - 1) / BLOCK));
  auto part_m = torch::empty({H, splits, M}, q.options());
  auto part_l = torch::empty({H, splits, M}, q.options());
  auto part_acc = torch::empty({H, splits, M, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t kh = k.stride(0), kr = k.stride(1), vh = v.stride(0), vr = v.stride(1);
  const int64_t per = ((L + splits - 1) / splits + BLOCK - 1) / BLOCK * BLOCK;
  float *pm = part_m.data_ptr<float>(), *pl = part_l.data_ptr<float>(), *pa = part_acc.data_ptr<float>();
  at::parallel_for(0, H * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / splits, s = i % splits;
      const int64_t lo = std::min(L, s * per), hi = std::min(L, lo + per);
      attend_range(qp + h * M * D, M, D, kp + h * kh, kr, vp + h * vh, vr, lo, hi, scale, pm + i * M, pl + i * M,
                   pa + i * M * D);
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t m = 0; m < M; ++m) {
      float mx = -INFINITY, l = 0.f;
      for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, pm[(h * splits + s) * M + m]);
      float* o = op + (h * M + m) * D;
      std::fill(o, o + D, 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t i = h * splits + s;
        if (pl[i * M + m] == 0.f) continue;
        const float w = std::exp(pm[i * M + m] - mx);
        l += pl[i * M + m] * w;
        const float* a = pa + (i * M + m) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += a[d] * w;
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= l;
    }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode_attention", &decode_attention); }
