// Causal attention on packed bf16 rows for CPUs with oneDNN's brgemm (AMX / AVX-512 bf16): forward and backward.
//
// Why: ATen's CPU flash-attention backward runs its block GEMMs through cpublas::gemm, which in bf16 is no
// faster than fp32 (a SmolLM2 layer, 8 rows of ~340 tokens: ~45 ms backward against an 8 ms forward); its
// forward runs on brgemm but on the padded [B, H, L, d] grid, copied there and back. These kernels tile the
// same math in 64 x 64 blocks on brgemm with bf16 operands and fp32 accumulators, over the packed rows.
//
// Layout: tokens packed row after row (row b holds tokens cu[b] .. cu[b+1]); q, o, dout [N, H, d], k, v
// [N, G, d] (grouped-query attention: head h reads kv head h / (H / G)); lse [N, H] fp32, the forward's
// log-sum-exp of the scaled scores. Backward per (row, head), FlashAttention-2's:
//   P = exp(scale * Q K^T - lse) (causal), dV = P^T dO, dP = dO V^T, D = rowsum(dO * O),
//   dS = P * (dP - D) * scale, dQ = dS K, dK = dS^T Q.
// P and dS are rounded to bf16 for the GEMMs that read them (as FlashAttention does on GPUs); S, dP and every
// accumulator are fp32. One task per (row, kv head) owns that row's outputs for the head (o, lse forward; dK,
// dV and dQ of its query heads backward): no atomics, and the result does not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;
constexpr int64_t T = 64;   // tile rows / columns (queries, keys)
constexpr int64_t NC = 64;  // brgemm's widest N: wider B operands (head dims over 64) go in column chunks

// exp(x) for x <= ~0 (|rel. error| < 2e-7); branch-free plain float / int ops, so `omp simd` loops of it
// vectorise (std::exp and std::nearbyint would not without -ffast-math).
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // t rounded to the nearest integer (1.5 * 2^23 trick)
  const float f = (t - n) * 0.693147180559945f;     // exp(x) = 2^n * exp(f), |f| <= ln2 / 2
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// float -> bf16 bits, rounded to nearest even (the values here are finite)
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

struct Gemm {
  bool vnni;
  // B [K, N] row-major (ld_in) -> packed chunks of NC columns, each [K, NC] (K even; rows padded with zeros).
  void pack(const bf16* src, int64_t ld_in, int64_t K, int64_t N, bf16* dst) const {
    for (int64_t c = 0; c < N; c += NC) {
      const int64_t w = std::min(NC, N - c);
      if (vnni) {
        cpublas::pack(K, w, ld_in, w, at::kBFloat16, at::kBFloat16, src + c, dst + c * K);
      } else {
        for (int64_t r = 0; r < K; ++r) std::memcpy(dst + c * K + r * w, src + r * ld_in + c, w * sizeof(bf16));
      }
    }
  }
  // C [M, N] (+)= A [M, K] (ld_a) @ B (packed by pack()), C fp32 with ld_c.
  void run(int64_t M, int64_t N, int64_t K, const bf16* A, int64_t ld_a, const bf16* Bp, float* C,
           int64_t ld_c, bool add) const {
    for (int64_t c = 0; c < N; c += NC) {
      const int64_t w = std::min(NC, N - c);
      cpublas::brgemm(M, w, K, ld_a, w, ld_c, add, A, Bp + c * K, C + c, vnni);
    }
  }
};

// rows [r0, r0 + n) of x [*, ld] (columns col0 .. col0 + d) -> dst [T, d], zero rows past n
inline void load_tile(const bf16* x, int64_t ld, int64_t r0, int64_t n, int64_t d, bf16* dst) {
  for (int64_t r = 0; r < T; ++r) {
    if (r < n) std::memcpy(dst + r * d, x + (r0 + r) * ld, d * sizeof(bf16));
    else std::memset(static_cast<void*>(dst + r * d), 0, d * sizeof(bf16));
  }
}

inline void transpose(const bf16* src, int64_t rows, int64_t cols, bf16* dst) {  // [rows, cols] -> [cols, rows]
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// One key block of the forward's online softmax for a query tile: S [T, T] scores (unscaled) -> P16 [T, T] bf16
// probabilities against the running row max m, the running sums l and the output accumulator acc [T, d]
// rescaled to it. full: every key column visible (a block left of the diagonal), else the causal diagonal.
void online_softmax(const float* S, bf16* P16, float* m, float* l, float* acc, int64_t rows, bool full, bool rescale,
                    int64_t d, float scale) {
  for (int64_t r = 0; r < T; ++r) {
    uint16_t* p16 = reinterpret_cast<uint16_t*>(P16) + r * T;
    if (r >= rows) {  // padding query rows: P = 0, nothing else read
      std::memset(p16, 0, T * sizeof(uint16_t));
      continue;
    }
    const float last = full ? T - 1.f : static_cast<float>(r);  // last key column this row sees
    const float* sr = S + r * T;
    // row max of the visible scores, in 16 lanes (element-wise selects vectorise; a max reduction did not)
    float lane[16];
    std::fill(lane, lane + 16, -std::numeric_limits<float>::infinity());
    for (int32_t c0 = 0; c0 < static_cast<int32_t>(T); c0 += 16) {
#pragma omp simd
      for (int32_t u = 0; u < 16; ++u) {
        const float sv = sr[c0 + u];
        lane[u] = static_cast<float>(c0 + u) <= last && sv > lane[u] ? sv : lane[u];
      }
    }
    float mx = lane[0];
    for (int u = 1; u < 16; ++u) mx = std::max(mx, lane[u]);
    mx *= scale;  // scale > 0: the max of scale * s
    const float mnew = std::max(m[r], mx), alpha = exp_neg(m[r] - mnew);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int32_t c = 0; c < static_cast<int32_t>(T); ++c) {
      const float e = exp_neg(sr[c] * scale - mnew);
      const float pv = static_cast<float>(c) <= last ? e : 0.f;
      sum += pv;
      p16[c] = bf16_bits(pv);
    }
    l[r] = l[r] * alpha + sum;
    m[r] = mnew;
    if (rescale) {
      float* ar = acc + r * d;
#pragma omp simd
      for (int32_t c = 0; c < static_cast<int32_t>(d); ++c) ar[c] *= alpha;
    }
  }
}

}  // namespace

// Forward, FlashAttention-2's online softmax per (row, kv head) task: the row's K^T and V packed once per key
// block, then for each query head of the group and each query block i, over key blocks j <= i:
//   S = Q_i K_j^T, m' = max(m, rowmax(scale * S)), P = exp(scale * S - m'),
//   acc = acc * exp(m - m') + P V_j, l = l * exp(m - m') + rowsum(P);     o = acc / l, lse = m + log(l).
// P is rounded to bf16 for its GEMM and summed in fp32 (as ATen's CPU flash forward does).
std::vector<at::Tensor> attention_fwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor cu, double scale_d) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attention_fwd: q, k, v must be bf16");
  TORCH_CHECK(cu.scalar_type() == at::kLong, "attention_fwd: cu int64");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); cu = cu.contiguous();
  const int64_t N = q.size(0), H = q.size(1), d = q.size(2), G = k.size(1), B = cu.size(0) - 1;
  TORCH_CHECK(G > 0 && H % G == 0 && d % 2 == 0 && k.size(0) == N && v.sizes() == k.sizes(),
              "attention_fwd: shapes q [N, H, d], k/v [N, G, d] (H % G == 0, d even)");
  const int64_t rep = H / G;
  const float scale = static_cast<float>(scale_d);
  auto o = at::empty_like(q);
  auto lse = at::empty({N, H}, q.options().dtype(at::kFloat));
  const bf16 *Q = q.data_ptr<bf16>(), *K = k.data_ptr<bf16>(), *V = v.data_ptr<bf16>();
  const int64_t* CU = cu.data_ptr<int64_t>();
  bf16* O = o.data_ptr<bf16>();
  float* LSE = lse.data_ptr<float>();
  const Gemm gemm{cpublas::could_pack(at::kBFloat16)};

  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> tile(T * std::max(d, T)), tileT(T * std::max(d, T)), Qa(T * d), P16(T * T);
    std::vector<float> S(T * T), acc(T * d), m(T), l(T);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / G, g = task % G, start = CU[b], n = CU[b + 1] - start;
      if (n <= 0) continue;
      const int64_t nb = (n + T - 1) / T;
      std::vector<bf16> KTp(nb * d * T), Vp(nb * T * d);  // per key block: K^T [d, T] and V [T, d], packed
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t rows = std::min(T, n - j * T);
        load_tile(K + ((start + j * T) * G + g) * d, G * d, 0, rows, d, tile.data());
        transpose(tile.data(), T, d, tileT.data());
        gemm.pack(tileT.data(), T, d, T, KTp.data() + j * d * T);
        load_tile(V + ((start + j * T) * G + g) * d, G * d, 0, rows, d, tile.data());
        gemm.pack(tile.data(), d, T, d, Vp.data() + j * T * d);
      }
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t rows = std::min(T, n - i * T), q0 = start + i * T;
          load_tile(Q + (q0 * H + h) * d, H * d, 0, rows, d, Qa.data());
          std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
          std::fill(l.begin(), l.end(), 0.f);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j <= i; ++j) {
            gemm.run(T, T, d, Qa.data(), d, KTp.data() + j * d * T, S.data(), T, false);
            online_softmax(S.data(), P16.data(), m.data(), l.data(), acc.data(), rows, j < i, j > 0, d, scale);
            gemm.run(T, d, T, P16.data(), T, Vp.data() + j * T * d, acc.data(), d, true);
          }
          for (int64_t r = 0; r < rows; ++r) {
            uint16_t* out = reinterpret_cast<uint16_t*>(O) + ((q0 + r) * H + h) * d;
            const float inv = 1.f / l[r];
#pragma omp simd
            for (int32_t c = 0; c < static_cast<int32_t>(d); ++c) out[c] = bf16_bits(acc[r * d + c] * inv);
            LSE[(q0 + r) * H + h] = m[r] + std::log(l[r]);
          }
        }
      }
    }
    cpublas::brgemm_release(gemm.vnni);
  });
  return {o, lse};
}

bool brgemm_bf16_available() { return cpublas::could_pack(at::kBFloat16); }

std::vector<at::Tensor> attention_bwd(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor o,
                                         at::Tensor dout, at::Tensor lse, at::Tensor cu, double scale_d) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16 && o.scalar_type() == at::kBFloat16 &&
                  dout.scalar_type() == at::kBFloat16, "attention_bwd: q, k, v, o, dout must be bf16");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && cu.scalar_type() == at::kLong, "attention_bwd: lse fp32, cu int64");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous(); o = o.contiguous(); dout = dout.contiguous();
  lse = lse.contiguous(); cu = cu.contiguous();
  const int64_t N = q.size(0), H = q.size(1), d = q.size(2), G = k.size(1), B = cu.size(0) - 1;
  TORCH_CHECK(G > 0 && H % G == 0 && d % 2 == 0 && k.size(0) == N && v.sizes() == k.sizes() &&
                  o.sizes() == q.sizes() && dout.sizes() == q.sizes() && lse.size(0) == N && lse.size(1) == H,
              "attention_bwd: shapes q/o/dout [N, H, d], k/v [N, G, d] (H % G == 0, d even), lse [N, H]");
  const int64_t rep = H / G;
  const float scale = static_cast<float>(scale_d);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const bf16 *Q = q.data_ptr<bf16>(), *K = k.data_ptr<bf16>(), *V = v.data_ptr<bf16>(), *O = o.data_ptr<bf16>(),
             *dO = dout.data_ptr<bf16>();
  const float* LSE = lse.data_ptr<float>();
  const int64_t* CU = cu.data_ptr<int64_t>();
  bf16 *dQ = dq.data_ptr<bf16>(), *dK = dk.data_ptr<bf16>(), *dV = dv.data_ptr<bf16>();
  const Gemm gemm{cpublas::could_pack(at::kBFloat16)};

  at::parallel_for(0, B * G, 1, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> tile(T * std::max(d, T)), tileT(T * std::max(d, T));
    std::vector<bf16> Qa(T * d), dOa(T * d), QaT(d * T), dOaT(d * T);
    std::vector<float> S(T * T), P(T * T), dQacc(T * d), Dq(T), Lq(T);
    std::vector<bf16> P16(T * T), dS16(T * T), Bp(T * T);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / G, g = task % G, start = CU[b], n = CU[b + 1] - start;
      if (n <= 0) continue;
      const int64_t nb = (n + T - 1) / T;
      // per key block: K^T and V^T [d, T] (B of S and dP), K [T, d] (B of dQ); dK^T, dV^T accumulators [d, T]
      std::vector<bf16> KTp(nb * d * T), VTp(nb * d * T), Kp(nb * T * d);
      std::vector<float> dKT(nb * d * T, 0.f), dVT(nb * d * T, 0.f);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t rows = std::min(T, n - j * T);
        load_tile(K + ((start + j * T) * G + g) * d, G * d, 0, rows, d, tile.data());
        gemm.pack(tile.data(), d, T, d, Kp.data() + j * T * d);
        transpose(tile.data(), T, d, tileT.data());
        gemm.pack(tileT.data(), T, d, T, KTp.data() + j * d * T);
        load_tile(V + ((start + j * T) * G + g) * d, G * d, 0, rows, d, tile.data());
        transpose(tile.data(), T, d, tileT.data());
        gemm.pack(tileT.data(), T, d, T, VTp.data() + j * d * T);
      }
      for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t rows = std::min(T, n - i * T), q0 = start + i * T;
          load_tile(Q + (q0 * H + h) * d, H * d, 0, rows, d, Qa.data());
          load_tile(dO + (q0 * H + h) * d, H * d, 0, rows, d, dOa.data());
          transpose(Qa.data(), T, d, QaT.data());
          transpose(dOa.data(), T, d, dOaT.data());
          for (int64_t r = 0; r < rows; ++r) {
            const uint16_t* orow = reinterpret_cast<const uint16_t*>(O) + ((q0 + r) * H + h) * d;
            const uint16_t* grow = reinterpret_cast<const uint16_t*>(dOa.data()) + r * d;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < d; ++c) acc += bf16_float(grow[c]) * bf16_float(orow[c]);
            Dq[r] = acc;
            Lq[r] = LSE[(q0 + r) * H + h];
          }
          std::fill(dQacc.begin(), dQacc.end(), 0.f);
          for (int64_t j = 0; j <= i; ++j) {
            gemm.run(T, T, d, Qa.data(), d, KTp.data() + j * d * T, S.data(), T, false);
            // P = exp(scale * S - lse) on real query rows and causal keys, 0 elsewhere
            for (int64_t r = 0; r < T; ++r) {
              const float last = r >= rows ? -1.f : (j < i ? T - 1.f : r);  // last key column this row sees
              const float l = r < rows ? Lq[r] : 0.f;
              float* pr = P.data() + r * T;
              const float* sr = S.data() + r * T;
              uint16_t* p16 = reinterpret_cast<uint16_t*>(P16.data()) + r * T;
#pragma omp simd
              for (int32_t c = 0; c < static_cast<int32_t>(T); ++c) {  // 32-bit c: AVX2 converts int32 lanes
                const float e = exp_neg(sr[c] * scale - l);
                const float pv = static_cast<float>(c) <= last ? e : 0.f;
                pr[c] = pv;
                p16[c] = bf16_bits(pv);
              }
            }
            // dV_j^T [d, keys] += dO_i^T [d, queries] @ P [queries, keys]
            gemm.pack(P16.data(), T, T, T, Bp.data());
            gemm.run(d, T, T, dOaT.data(), T, Bp.data(), dVT.data() + j * d * T, T, true);
            gemm.run(T, T, d, dOa.data(), d, VTp.data() + j * d * T, S.data(), T, false);  // S now holds dP
            for (int64_t r = 0; r < T; ++r) {
              const float D = r < rows ? Dq[r] : 0.f;
              const float* pr = P.data() + r * T;
              const float* dpr = S.data() + r * T;
              uint16_t* ds = reinterpret_cast<uint16_t*>(dS16.data()) + r * T;
#pragma omp simd
              for (int32_t c = 0; c < static_cast<int32_t>(T); ++c) ds[c] = bf16_bits(pr[c] * (dpr[c] - D) * scale);
            }
            gemm.run(T, d, T, dS16.data(), T, Kp.data() + j * T * d, dQacc.data(), d, true);
            // dK_j^T [d, keys] += Q_i^T [d, queries] @ dS [queries, keys]
            gemm.pack(dS16.data(), T, T, T, Bp.data());
            gemm.run(d, T, T, QaT.data(), T, Bp.data(), dKT.data() + j * d * T, T, true);
          }
          for (int64_t r = 0; r < rows; ++r) {
            uint16_t* out = reinterpret_cast<uint16_t*>(dQ) + ((q0 + r) * H + h) * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) out[c] = bf16_bits(dQacc[r * d + c]);
          }
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t j = r / T, rr = r % T;
        uint16_t* ok = reinterpret_cast<uint16_t*>(dK) + ((start + r) * G + g) * d;
        uint16_t* ov = reinterpret_cast<uint16_t*>(dV) + ((start + r) * G + g) * d;
        for (int64_t c = 0; c < d; ++c) {
          ok[c] = bf16_bits(dKT[(j * d + c) * T + rr]);
          ov[c] = bf16_bits(dVT[(j * d + c) * T + rr]);
        }
      }
    }
    cpublas::brgemm_release(gemm.vnni);
  });
  return {dq, dk, dv};
}
