// Dropout whose mask is a pure function of (seed, element index): Philox4x32-10 (Salmon et al., SC'11, the
// counter-based generator of Random123, cuRAND and torch's CUDA dropout) in counter mode.
//
// Why: LoRA dropout on a CPU drew 16 random bits an element from torch's generator (randint, ~3 ms for a
// [2800, 576] input), compared them, converted the bool mask to the input's dtype and multiplied, then did
// the conversion and multiply again in the backward: ~6 ms a call, 60 calls a stage-1 step. Here one pass
// hashes the counters and scales the input; the backward regenerates the same mask from the seed (nothing
// saved between them).
//
// Stream: block b = Philox4x32-10(counter (b mod 2^32, b >> 32, 0, 0), key (seed mod 2^32, seed >> 32)) gives
// eight 16-bit values (word w's low half, then its high half, w = 0..3). Elements go in groups of 64: element
// e = 64 g + 8 j + l takes value j of block 8 g + l (8 blocks side by side are one AVX2 register's lanes, so
// the mask is built a value index at a time). Kept when that value >= cut (p = cut / 65536). thinkrec_kernels/dropout.py computes the
// same stream in plain torch ops (the reference, and the path where this cannot be built).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cstring>
#include <vector>

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // Philox4x32 multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key bumps (golden ratio, sqrt(3) - 1)
constexpr int32_t kLanes = 8;                              // blocks hashed side by side (an AVX2 register)

#ifdef __AVX2__
// hi and lo 32-bit halves of a * m in each of 8 uint32 lanes (vpmuludq multiplies the even lanes to 64 bits)
inline void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

// c[4][kLanes] <- Philox4x32-10 of each lane's counter (c[w][l]: word w of lane l)
inline void philox_lanes(uint32_t (&c)[4][kLanes], uint32_t k0, uint32_t k1) {
#ifdef __AVX2__
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0)), m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[0]));
  __m256i c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[1]));
  __m256i c2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[2]));
  __m256i c3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[3]));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[3]), c3);
#else
  for (int round = 0; round < 10; ++round) {
    for (int32_t l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0][l], p1 = static_cast<uint64_t>(kM1) * c[2][l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1][l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3][l] ^ k1;
      c[1][l] = static_cast<uint32_t>(p1);
      c[3][l] = static_cast<uint32_t>(p0);
      c[0][l] = n0;
      c[2][l] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
#endif
}

inline float to_float(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

// float -> bf16 rounded to nearest even, NaN kept a (quiet) NaN: what torch's conversion does
inline at::BFloat16 from_float(float f, at::BFloat16) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t bits = f != f ? 0x7FC0u : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return at::BFloat16(bits, at::BFloat16::from_bits());
}
inline float from_float(float f, float) { return f; }
inline double from_float(double f, double) { return f; }

#ifdef __AVX2__
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const at::BFloat16* x) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
inline void store8(at::BFloat16* y, __m256 v) {  // rounded to nearest even, NaN a quiet NaN (torch's conversion)
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), packed);
}
#endif

// y[e] = x[e] * (kept ? scale : 0) for the 64 elements of a group from its 8 blocks' words c
template <typename scalar_t, typename acc_t>
inline void scale_group(const uint32_t (&c)[4][kLanes], const scalar_t* x, scalar_t* y, int64_t cnt, uint32_t cut,
                        acc_t kept) {
#ifdef __AVX2__
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (cnt == 8 * kLanes) {
      const __m256i lim = _mm256_set1_epi32(static_cast<int>(cut) - 1), low = _mm256_set1_epi32(0xFFFF);
      const __m256 sc = _mm256_set1_ps(kept);
      for (int32_t j = 0; j < 8; ++j) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c[j >> 1]));
        const __m256i v = (j & 1) ? _mm256_srli_epi32(w, 16) : _mm256_and_si256(w, low);
        const __m256 m = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, lim)), sc);
        store8(y + 8 * j, _mm256_mul_ps(load8(x + 8 * j), m));
      }
      return;
    }
  }
#endif
  for (int64_t e = 0; e < cnt; ++e) {
    const int64_t j = e / kLanes, l = e % kLanes;
    const uint32_t v = (c[j >> 1][l] >> (16 * (j & 1))) & 0xFFFFu;
    y[e] = from_float(to_float(x[e]) * (v >= cut ? kept : acc_t(0)), scalar_t());
  }
}

template <typename scalar_t>
void apply(const scalar_t* x, scalar_t* y, int64_t n, uint64_t seed, uint32_t cut, double scale) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t kept = static_cast<acc_t>(scale);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const int64_t per_group = 8 * kLanes;  // elements one philox_lanes call covers
  const int64_t groups = (n + per_group - 1) / per_group;
  at::parallel_for(0, groups, 128, [&](int64_t g0, int64_t g1) {
    uint32_t c[4][kLanes];
    for (int64_t g = g0; g < g1; ++g) {
      const uint64_t b0 = static_cast<uint64_t>(g) * kLanes;
      for (int32_t l = 0; l < kLanes; ++l) {
        c[0][l] = static_cast<uint32_t>(b0 + l);
        c[1][l] = static_cast<uint32_t>((b0 + l) >> 32);
        c[2][l] = 0;
        c[3][l] = 0;
      }
      philox_lanes(c, k0, k1);
      const int64_t e0 = g * per_group;
      scale_group(c, x + e0, y + e0, std::min(per_group, n - e0), cut, kept);
    }
  });
}

}  // namespace

at::Tensor philox_dropout(const at::Tensor& x_in, int64_t seed, int64_t cut, double scale) {
  TORCH_CHECK(x_in.device().is_cpu(), "philox_dropout: a CPU tensor");
  TORCH_CHECK(cut >= 0 && cut <= 65536, "philox_dropout: cut in [0, 65536]");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t c = static_cast<uint32_t>(cut);
  switch (x.scalar_type()) {
    case at::kBFloat16: apply(x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), n, s, c, scale); break;
    case at::kFloat: apply(x.data_ptr<float>(), y.data_ptr<float>(), n, s, c, scale); break;
    case at::kDouble: apply(x.data_ptr<double>(), y.data_ptr<double>(), n, s, c, scale); break;
    default: TORCH_CHECK(false, "philox_dropout: bf16, fp32 or fp64, not ", x.scalar_type());
  }
  return y;
}

std::vector<int64_t> philox4x32_10(const std::vector<int64_t>& ctr, const std::vector<int64_t>& key) {
  TORCH_CHECK(ctr.size() == 4 && key.size() == 2, "philox4x32_10: a counter of 4 words and a key of 2");
  uint32_t c[4][kLanes] = {};
  for (int w = 0; w < 4; ++w) c[w][0] = static_cast<uint32_t>(ctr[w]);
  philox_lanes(c, static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  return {c[0][0], c[1][0], c[2][0], c[3][0]};
}
