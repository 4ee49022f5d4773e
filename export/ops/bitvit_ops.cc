// bitvit's ONNX Runtime custom ops: linear layers on packed ternary, binary, int4 and int8 weights.
//
// Domain "bitvit", version 1, CPU:
//   TernaryLinear(X, W, scales[, bias[, norm_weight, norm_bias[, norm2_weight, norm2_bias]]]) -> Y
//       2-bit codes c = w + 1, w in {-1, 0, +1}
//   BinaryLinear(same inputs) -> Y    1-bit codes, c = 1 means +1, 0 means -1
//   Int4Linear(same inputs) -> Y      4-bit codes c = w + 8, w in [-8, 7]
//   Int8Linear(same inputs) -> Y      8-bit codes c = w + 128, w in [-128, 127]
// X float32 (..., K); W uint8 (N, ceil(K * bits / 8)) in quant/pack.py's `pack_codes` layout;
// scales float32 (N) or (N, 1); bias float32 (N); norm_weight, norm_bias float32 (K), given together:
// a LayerNorm (attribute `epsilon`, default 1e-5) applied to each row of X in the same pass that
// quantizes it (BitNet puts one before every quantized linear); norm2_weight, norm2_bias (K, attribute
// `epsilon2`, default 1e-5): a second LayerNorm applied after the first (a ViT block's pre-norm
// followed by the BitNet layer's own); it needs the first. Attribute `activation`: "none" (default) or
// "gelu", applied to Y: x / 2 * (1 + erf(x / sqrt 2)), within 9.5e-7 of exact on [-10, 10]. Attribute
// `in_features` (optional): K, which X's last dimension must equal (W's row bytes alone leave it open
// within a byte's codes, and padding codes would multiply a wider X's extra features).
// Y float32 (..., N).
// Per token t (row of X, after the LayerNorms when there are any):
//   s[t] = max_k |X[t, k]| / 127,  q[t, k] = clamp(nearbyint(X[t, k] / s[t]), -127, 127)
//   Y[t, n] = act(s[t] * scales[n] * sum_k q[t, k] * w[n, k] + bias[n])
// The sum is exact int32 arithmetic (in_features up to INT32_MAX / (254 * max code): 33,155 at int8, more at
// fewer bits; wider X is refused). The kernels never expand W to int8 in memory: at session
// creation (or per call when W is not a constant) the codes are re-tiled, still at `bits` bits per
// weight, into 64-byte blocks of 16 output rows; each block unpacks in registers (shift + mask) to
// the unsigned operand of an int8 dot product with the signed activations:
//   sum_k c[n, k] * q[t, k]  is  dot + sum_k q[t, k]       for ternary (c = w + 1)
//                                (dot + sum_k q[t, k]) / 2   for binary  (c = (w + 1) / 2)
//                                dot + 8 * sum_k q[t, k]     for int4    (c = w + 8)
//                                dot + 128 * sum_k q[t, k]   for int8    (c = w + 128)
// so dot is that sum (twice it for binary) less a multiple of the token's sum of q (`Dot` below).
// Kernels: AVX-512 VNNI (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd) or portable C++, chosen when the
// library is compiled (it is built with -march=native on the machine that runs it). Work is split
// over blocks of output rows x tokens on ONNX Runtime's own intra-op thread pool, except for small
// problems (a CIFAR ViT at batch 1), which run on the calling thread.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(BITVIT_FORCE_PORTABLE)
#define BITVIT_ISA "portable"
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(BITVIT_FORCE_AVX2)
#define BITVIT_AVX512 1
#define BITVIT_ISA "avx512-vnni"
#elif defined(__AVX2__)
#define BITVIT_AVX2 1
#define BITVIT_ISA "avx2"
#else
#define BITVIT_ISA "portable"
#endif

namespace {

constexpr int kPanel = 16;      // output rows per 64-byte block
constexpr int kBlockBytes = 64;
#ifndef BITVIT_MR
#define BITVIT_MR 4
#define BITVIT_NB 4
#endif
constexpr int kMR = BITVIT_MR;          // tokens per micro-kernel call
constexpr int kNB = BITVIT_NB;          // panels (of 16 output rows) per task
constexpr int kTokensPerTask = 32;

// Codes re-tiled for the kernels: block (p, g) holds output rows 16p..16p+15 and KG = 32 / bits
// inputs starting at g * KG. Byte i of a block, bit field j (width `bits`), holds the code of row
// 16p + i / 4 and input g * KG + 4j + i % 4: shifting the block right by j * bits and masking
// gives the 16 x 4 unsigned byte operand of one 4-wide dot-product step.
struct Tiled {
  int bits = 0;
  int64_t n = 0, k_max = 0, groups = 0, panels = 0, row_bytes = 0;
  std::vector<uint8_t> data;  // panels * groups * 64 bytes
  int64_t k_per_group() const { return 32 / bits; }
};

std::string Shape(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// Re-tile packed rows W (n, row_bytes). Returns an error message, empty when the codes are valid.
std::string TileWeights(const uint8_t* w, int64_t n, int64_t row_bytes, int bits, Tiled* t) {
  t->bits = bits;
  t->n = n;
  t->row_bytes = row_bytes;
  t->k_max = row_bytes * 8 / bits;
  const int64_t kg = t->k_per_group();
  t->groups = (t->k_max + kg - 1) / kg;
  t->panels = (n + kPanel - 1) / kPanel;
  t->data.assign(static_cast<size_t>(t->panels * t->groups * kBlockBytes), 0);
  const int mask = (1 << bits) - 1;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = w + r * row_bytes;
    for (int64_t k = 0; k < t->k_max; ++k) {
      const int code = (row[k * bits / 8] >> (k * bits % 8)) & mask;
      if (bits == 2 && code == 3)
        return "TernaryLinear: W row " + std::to_string(r) + " holds the 2-bit code 3 at input " +
               std::to_string(k) + "; ternary codes are 0, 1 or 2";
      const int64_t g = k / kg, kk = k % kg;
      const int64_t i = (r % kPanel) * 4 + kk % 4, j = kk / 4;
      t->data[static_cast<size_t>(((r / kPanel) * t->groups + g) * kBlockBytes + i)] |=
          static_cast<uint8_t>(code << (j * bits));
    }
  }
  return {};
}

// One call's operands: quantized activations and everything the kernels read.
struct Problem {
  const Tiled* w;
  const float* x;         // (m, k)
  int64_t m, k, kp;       // kp = groups * k_per_group: the padded row length of xq
  int8_t* xq;             // (m, kp), zero past k
  float* sx;              // (m) activation scales
  int32_t* sumq;          // (m) sum of each token's q
  const float* scales;    // (n)
  const float* bias;      // (n) or nullptr
  const float* norm_w[2];  // (k) weights of the LayerNorms applied in turn, nullptr where absent
  const float* norm_b[2];  // (k) their biases
  float eps[2];
  bool gelu;               // GELU on Y
  float* y;               // (m, n)
  int64_t token_blocks, n_blocks;
};

// s[t] = absmax / 127; q = clamp(nearbyint(x / s), -127, 127): the division (not a multiply by the
// reciprocal) and round-half-to-even match torch's reference bit for bit.
// A row holding NaN or inf gets a NaN scale and all-zero codes, so its outputs are NaN, as torch's are.
void QuantizeRow(const float* x, int64_t k, int64_t kp, int8_t* q, float* s, int32_t* sum) {
  float amax = 0.f;
  bool finite = true;
  int64_t i = 0;
#if defined(BITVIT_AVX512)
  __m512 vmax = _mm512_setzero_ps();
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  __mmask16 bad = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);  // inf or NaN
    vmax = _mm512_max_ps(vmax, a);
  }
  amax = _mm512_reduce_max_ps(vmax);
  finite = bad == 0;
#endif
  for (; i < k; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  const float scale = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
  *s = scale;
  int32_t total = 0;
  i = 0;
  if (finite && scale > 0.f) {  // not amax > 0: a row of denormals below 127 * FLT_TRUE_MIN has scale 0
#if defined(BITVIT_AVX512)
    const __m512 vs = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    __m512i vsum = _mm512_setzero_si512();
    for (; i + 16 <= k; i += 16) {
      __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + i), vs);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
      vsum = _mm512_add_epi32(vsum, qi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(qi));
    }
    total = _mm512_reduce_add_epi32(vsum);
#endif
    for (; i < k; ++i) {
      const float v = std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / scale)));
      q[i] = static_cast<int8_t>(v);
      total += q[i];
    }
  } else {
    std::memset(q, 0, static_cast<size_t>(k));
  }
  std::memset(q + k, 0, static_cast<size_t>(kp - k));
  *sum = total;
}

// GELU(x) = x / 2 * (1 + erf(x / sqrt 2)) with erf(z) = z P(z^2) / Q(z^2) on |z| <= 3.92 (beyond it erf
// is +-1 in float32): a rational least-squares fit made for bitvit (weighted to the error it gives GELU),
// at most 9.5e-7, and 2.2e-7 of max(1, |x|), off exact GELU on [-10, 10] in float32
// (tests/test_export_ops.py). NaN stays NaN through the final multiply by x.
constexpr float kErfClamp = 3.92f;
constexpr float kErfP[] = {1.12837923f, 0.191683367f, 0.0559923016f, 0.00422881404f, 0.000428643456f, 7.50421532e-06f};
constexpr float kErfQ[] = {1.0f,          0.503208995f, 0.117355473f,  0.0163598452f,  0.00144378375f,
                           7.77308669e-05f, 2.98781686e-07f};

inline float Gelu(float x) {
  const float z = std::min(std::max(x * 0.707106781f, -kErfClamp), kErfClamp), t = z * z;
  float num = kErfP[5], den = kErfQ[6];
  for (int i = 4; i >= 0; --i) num = num * t + kErfP[i];
  for (int i = 5; i >= 0; --i) den = den * t + kErfQ[i];
  const float erf = std::min(std::max(z * num / den, -1.f), 1.f);
  return 0.5f * x * (1.f + erf);
}

#if defined(BITVIT_AVX512)
inline __m512 Gelu(__m512 x) {  // the same, 16 lanes
  const __m512 z = _mm512_min_ps(_mm512_set1_ps(kErfClamp), _mm512_max_ps(_mm512_set1_ps(-kErfClamp),
                                                                           _mm512_mul_ps(x, _mm512_set1_ps(0.707106781f))));
  const __m512 t = _mm512_mul_ps(z, z);
  __m512 num = _mm512_set1_ps(kErfP[5]), den = _mm512_set1_ps(kErfQ[6]);
  for (int i = 4; i >= 0; --i) num = _mm512_fmadd_ps(num, t, _mm512_set1_ps(kErfP[i]));
  for (int i = 5; i >= 0; --i) den = _mm512_fmadd_ps(den, t, _mm512_set1_ps(kErfQ[i]));
  __m512 erf = _mm512_div_ps(_mm512_mul_ps(z, num), den);
  erf = _mm512_min_ps(_mm512_set1_ps(1.f), _mm512_max_ps(_mm512_set1_ps(-1.f), erf));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}
#endif

// c = w + kOffset (ternary, int4, int8); binary: 2c = w + kOffset.
template <int BITS>
constexpr int32_t kOffset = BITS <= 2 ? 1 : 1 << (BITS - 1);

// dot = sum_k w[n, k] * q[t, k] from acc = sum_k c[n, k] * q[t, k] and the token's sum of q (exact).
template <int BITS>
constexpr int32_t Dot(int32_t acc, int32_t sumq) {
  return BITS == 1 ? 2 * acc - sumq : acc - kOffset<BITS> * sumq;
}

// Y row segment from raw dot sums `acc` (count values): exact integer correction, then float scaling.
template <int BITS>
inline void Epilogue(const Problem& p, int64_t t, int64_t n0, int count, const int32_t* acc) {
  const int32_t sq = p.sumq[t];
  const float s = p.sx[t];
  float* y = p.y + t * p.w->n + n0;
  const float* sc = p.scales + n0;
  for (int j = 0; j < count; ++j) y[j] = static_cast<float>(Dot<BITS>(acc[j], sq)) * s * sc[j];
  if (p.bias)
    for (int j = 0; j < count; ++j) y[j] += p.bias[n0 + j];
  if (p.gelu)
    for (int j = 0; j < count; ++j) y[j] = Gelu(y[j]);
}

inline const uint8_t* Block(const Tiled& w, int64_t panel, int64_t g) {
  return w.data.data() + (panel * w.groups + g) * kBlockBytes;
}

#if defined(BITVIT_AVX512)
// MR tokens x NP panels: MR * NP accumulators of 16 int32 lanes (one lane per output row).
template <int BITS, int MR, int NP>
void MicroKernel(const Problem& p, int64_t t0, int64_t panel0) {
  constexpr int kSteps = 8 / BITS;
  constexpr int kKG = 4 * kSteps;
  const Tiled& w = *p.w;
  __m512i acc[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_setzero_si512();
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const int8_t* x = p.xq + t0 * p.kp;
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512i blk[NP];
    for (int q = 0; q < NP; ++q) blk[q] = _mm512_loadu_si512(Block(w, panel0 + q, g));
    for (int j = 0; j < kSteps; ++j) {
      __m512i wv[NP];
      for (int q = 0; q < NP; ++q) {
        wv[q] = _mm512_and_si512(blk[q], mask);
        blk[q] = _mm512_srli_epi16(blk[q], BITS);
      }
      for (int m = 0; m < MR; ++m) {
        int32_t x4;
        std::memcpy(&x4, x + m * p.kp + g * kKG + 4 * j, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        for (int q = 0; q < NP; ++q) acc[m][q] = _mm512_dpbusd_epi32(acc[m][q], wv[q], xb);
      }
    }
  }
  for (int q = 0; q < NP; ++q) {
    const int64_t n0 = (panel0 + q) * kPanel;
    const __mmask16 valid = static_cast<__mmask16>((1u << std::min<int64_t>(kPanel, w.n - n0)) - 1);
    const __m512 sc = _mm512_maskz_loadu_ps(valid, p.scales + n0);
    const __m512 b = p.bias ? _mm512_maskz_loadu_ps(valid, p.bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m) {
      __m512i r = BITS == 1 ? _mm512_add_epi32(acc[m][q], acc[m][q]) : acc[m][q];
      r = _mm512_sub_epi32(r, _mm512_set1_epi32(kOffset<BITS> * p.sumq[t0 + m]));
      const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(r), _mm512_set1_ps(p.sx[t0 + m])), sc, b);
      _mm512_mask_storeu_ps(p.y + (t0 + m) * w.n + n0, valid, p.gelu ? Gelu(y) : y);
    }
  }
}
#elif defined(BITVIT_AVX2)
// MR tokens x NP panels; each panel is two 8-row halves (one 256-bit register each).
template <int BITS, int MR, int NP>
void MicroKernel(const Problem& p, int64_t t0, int64_t panel0) {
  constexpr int kSteps = 8 / BITS;
  constexpr int kKG = 4 * kSteps;
  const Tiled& w = *p.w;
  __m256i acc[MR][2 * NP];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < 2 * NP; ++q) acc[m][q] = _mm256_setzero_si256();
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const __m256i ones = _mm256_set1_epi16(1), c128 = _mm256_set1_epi16(128);
  const int8_t* x = p.xq + t0 * p.kp;
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256i blk[2 * NP];
    for (int q = 0; q < 2 * NP; ++q)
      blk[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Block(w, panel0 + q / 2, g) + 32 * (q % 2)));
    for (int j = 0; j < kSteps; ++j) {
      __m256i wv[2 * NP];
      for (int q = 0; q < 2 * NP; ++q) {
        wv[q] = _mm256_and_si256(blk[q], mask);
        blk[q] = _mm256_srli_epi16(blk[q], BITS);
      }
      for (int m = 0; m < MR; ++m) {
        int32_t x4;
        std::memcpy(&x4, x + m * p.kp + g * kKG + 4 * j, 4);
        const __m256i xb = _mm256_set1_epi32(x4);
        for (int q = 0; q < 2 * NP; ++q) {
          if constexpr (BITS == 8) {  // c = lo + 128 hi: a pair of c * q would saturate int16, of lo * q cannot
            const __m256i lo = _mm256_and_si256(wv[q], _mm256_set1_epi8(0x7f));
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv[q], 7), _mm256_set1_epi8(1));
            acc[m][q] = _mm256_add_epi32(acc[m][q], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xb), ones));
            acc[m][q] = _mm256_add_epi32(acc[m][q], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xb), c128));
          } else {  // a pair of code * q is at most 2 * 15 * 127: the int16 sums cannot saturate
            acc[m][q] = _mm256_add_epi32(acc[m][q], _mm256_madd_epi16(_mm256_maddubs_epi16(wv[q], xb), ones));
          }
        }
      }
    }
  }
  alignas(32) int32_t out[16];
  for (int m = 0; m < MR; ++m)
    for (int q = 0; q < NP; ++q) {
      const int64_t n0 = (panel0 + q) * kPanel;
      _mm256_store_si256(reinterpret_cast<__m256i*>(out), acc[m][2 * q]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + 8), acc[m][2 * q + 1]);
      Epilogue<BITS>(p, t0 + m, n0, static_cast<int>(std::min<int64_t>(kPanel, w.n - n0)), out);
    }
}
#else
// Portable C++: unpack each panel to one byte per code, then plain dot products the compiler vectorizes.
template <int BITS, int MR, int NP>
void MicroKernel(const Problem& p, int64_t t0, int64_t panel0) {
  constexpr int kSteps = 8 / BITS;
  constexpr int kKG = 4 * kSteps;
  const Tiled& w = *p.w;
  std::vector<uint8_t> codes(static_cast<size_t>(kPanel * p.kp));  // (16, kp)
  for (int q = 0; q < NP; ++q) {
    for (int64_t g = 0; g < w.groups; ++g) {
      const uint8_t* blk = Block(w, panel0 + q, g);
      for (int j = 0; j < kSteps; ++j)
        for (int i = 0; i < kBlockBytes; ++i)
          codes[(i / 4) * p.kp + g * kKG + 4 * j + i % 4] = (blk[i] >> (j * BITS)) & ((1 << BITS) - 1);
    }
    const int64_t n0 = (panel0 + q) * kPanel;
    for (int m = 0; m < MR; ++m) {
      const int8_t* x = p.xq + (t0 + m) * p.kp;
      int32_t out[kPanel];
      for (int r = 0; r < kPanel; ++r) {
        const uint8_t* c = codes.data() + r * p.kp;
        int32_t sum = 0;
        for (int64_t k = 0; k < p.kp; ++k) sum += c[k] * x[k];
        out[r] = sum;
      }
      Epilogue<BITS>(p, t0 + m, n0, static_cast<int>(std::min<int64_t>(kPanel, w.n - n0)), out);
    }
  }
}
#endif

// Tokens t0..t1 against panels panel0..panel0+NP-1, MR tokens at a time, then the remainder.
template <int BITS, int NP, int MR = kMR>
void RunTokens(const Problem& p, int64_t t0, int64_t t1, int64_t panel0) {
  int64_t t = t0;
  for (; t + MR <= t1; t += MR) MicroKernel<BITS, MR, NP>(p, t, panel0);
  if constexpr (MR > 1)
    if (t < t1) RunTokens<BITS, NP, MR - 1>(p, t, t1, panel0);
}

template <int BITS>
void RunTask(const Problem& p, int64_t task) {
  const int64_t tb = task % p.token_blocks, nb = task / p.token_blocks;
  const int64_t t0 = tb * kTokensPerTask, t1 = std::min(p.m, t0 + kTokensPerTask);
  const int64_t panel0 = nb * kNB;
  switch (std::min<int64_t>(kNB, p.w->panels - panel0)) {
    case 4: RunTokens<BITS, 4>(p, t0, t1, panel0); break;
    case 3: RunTokens<BITS, 3>(p, t0, t1, panel0); break;
    case 2: RunTokens<BITS, 2>(p, t0, t1, panel0); break;
    default: RunTokens<BITS, 1>(p, t0, t1, panel0); break;
  }
}

// out = LayerNorm(x) over k values: the mean, then the mean squared deviation, then the affine map.
// The sums run in 16 lanes (AVX-512 registers, double for the mean; or float arrays the compiler
// vectorizes), folded together in double; a finite row whose float sums overflow (deviations past ~1e19)
// is summed again in double.
void NormRow(const float* x, int64_t k, const float* w, const float* b, float eps, float* out) {
  constexpr int kLanes = 16;
  double sum = 0.0, var = 0.0;
  int64_t i = 0;
#if defined(BITVIT_AVX512)
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();  // the mean in double: rows far from 0
  for (; i + kLanes <= k; i += kLanes) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  sum = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
#else
  float lane[kLanes] = {};
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += x[i + j];
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
#endif
  for (; i < k; ++i) sum += x[i];
  float mean = static_cast<float>(sum / static_cast<double>(k));
  i = 0;
#if defined(BITVIT_AVX512)
  const __m512 vmean = _mm512_set1_ps(mean);
  __m512 acc = _mm512_setzero_ps();
  for (; i + kLanes <= k; i += kLanes) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmean);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  var = _mm512_reduce_add_ps(acc);
#else
  float sq[kLanes] = {};
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) sq[j] += (x[i + j] - mean) * (x[i + j] - mean);
  for (int j = 0; j < kLanes; ++j) var += sq[j];
#endif
  for (; i < k; ++i) var += (x[i] - mean) * (x[i] - mean);
  float rstd = 1.f / std::sqrt(static_cast<float>(var / static_cast<double>(k)) + eps);
  if (!std::isfinite(var)) {  // a row holding NaN or inf stays NaN
    sum = var = 0.0;
    for (i = 0; i < k; ++i) sum += x[i];
    const double mean64 = sum / static_cast<double>(k);
    for (i = 0; i < k; ++i) var += (x[i] - mean64) * (x[i] - mean64);
    mean = static_cast<float>(mean64);
    rstd = static_cast<float>(1.0 / std::sqrt(var / static_cast<double>(k) + eps));
  }
  i = 0;
#if defined(BITVIT_AVX512)
  const __m512 vcenter = _mm512_set1_ps(mean), vrstd = _mm512_set1_ps(rstd);
  for (; i + kLanes <= k; i += kLanes) {
    const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vcenter), vrstd);
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(d, _mm512_loadu_ps(w + i), _mm512_loadu_ps(b + i)));
  }
#endif
  for (; i < k; ++i) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

void QuantizeTask(void* data, size_t task) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t t0 = static_cast<int64_t>(task) * kTokensPerTask, t1 = std::min(p.m, t0 + kTokensPerTask);
  std::vector<float> normed(p.norm_w[0] ? static_cast<size_t>(p.k) : 0);
  for (int64_t t = t0; t < t1; ++t) {
    const float* x = p.x + t * p.k;
    for (int i = 0; i < 2 && p.norm_w[i]; ++i) {  // in place for the second: NormRow reads x[j] before writing out[j]
      NormRow(x, p.k, p.norm_w[i], p.norm_b[i], p.eps[i], normed.data());
      x = normed.data();
    }
    QuantizeRow(x, p.k, p.kp, p.xq + t * p.kp, p.sx + t, p.sumq + t);
  }
}

template <int BITS>
void GemmTask(void* data, size_t task) { RunTask<BITS>(*static_cast<const Problem*>(data), static_cast<int64_t>(task)); }

// Below these sizes a step runs on the calling thread: ORT's pool threads sleep between calls (spinning
// is off), and waking one costs about as much as quantizing 64K values or 4M multiply-adds (~10 us).
constexpr int64_t kSerialQuantize = int64_t{1} << 16;  // m * k
constexpr int64_t kSerialMacs = int64_t{1} << 22;      // m * k * n

void RunTasks(Ort::KernelContext& ctx, void (*fn)(void*, size_t), int64_t tasks, bool serial, Problem* p) {
  if (serial) {
    for (int64_t t = 0; t < tasks; ++t) fn(p, static_cast<size_t>(t));
  } else {
    ctx.ParallelFor(fn, static_cast<size_t>(tasks), 0, p);
  }
}

Ort::Status Invalid(const std::string& msg) { return Ort::Status(msg.c_str(), ORT_INVALID_ARGUMENT); }

struct PackedLinearKernel {
  PackedLinearKernel(const char* op, int bits, const OrtKernelInfo* info) : op_(op), bits_(bits) {
    Ort::ConstKernelInfo ki(info);
    const OrtApi& api = Ort::GetApi();
    for (int i = 0; i < 2; ++i) {  // the attributes are optional: a missing one leaves the default
      const char* name = i == 0 ? "epsilon" : "epsilon2";
      float eps = 1e-5f;
      if (!Given(name, "a float", api.KernelInfoGetAttribute_float(info, name, &eps))) eps = 1e-5f;
      if (!(eps > 0.f && std::isfinite(eps)))
        throw Ort::Exception(op_ + ": " + name + " must be a positive finite number, got " + std::to_string(eps),
                             ORT_INVALID_ARGUMENT);
      eps_[i] = eps;
    }
    if (Given("in_features", "an integer", api.KernelInfoGetAttribute_int64(info, "in_features", &in_features_)) &&
        in_features_ < 1)
      throw Ort::Exception(op_ + ": in_features must be at least 1, got " + std::to_string(in_features_),
                           ORT_INVALID_ARGUMENT);
    size_t size = 0;
    if (Given("activation", "a string", api.KernelInfoGetAttribute_string(info, "activation", nullptr, &size))) {
      std::string act(size, '\0');
      Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, "activation", act.data(), &size));
      const size_t len = std::strlen(act.c_str());
      if (len + 1 < size)  // "gelu\0x" would read as "gelu"
        throw Ort::Exception(op_ + ": activation holds a NUL character", ORT_INVALID_ARGUMENT);
      act.resize(len);
      if (act != "none" && act != "gelu")
        throw Ort::Exception(op_ + ": activation must be \"none\" or \"gelu\", got \"" + act + "\"",
                             ORT_INVALID_ARGUMENT);
      gelu_ = act == "gelu";
    }
    int is_constant = 0;
    Ort::ConstValue w = ki.GetTensorConstantInput(1, &is_constant);
    if (is_constant) {
      const std::string err = Prepare(w, &constant_);
      if (!err.empty()) throw Ort::Exception(std::string(err), ORT_INVALID_ARGUMENT);
      have_constant_ = true;
    }
  }

  // Whether the node has the attribute `name` that `status` (of reading it) is about; throws if it has
  // one of another type than `type`.
  bool Given(const char* name, const char* type, OrtStatus* status) const {
    if (status == nullptr) return true;
    const std::string why = Ort::GetApi().GetErrorMessage(status);
    Ort::GetApi().ReleaseStatus(status);
    if (why.find("No attribute") != std::string::npos) return false;
    throw Ort::Exception(op_ + ": " + name + " must be " + type + " attribute (" + why + ")", ORT_INVALID_ARGUMENT);
  }

  // Check W's type and rank and re-tile it; an error message or "".
  std::string Prepare(const Ort::ConstValue& w, Tiled* t) const {
    const auto info = w.GetTensorTypeAndShapeInfo();
    const auto shape = info.GetShape();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
      return op_ + ": W must be a uint8 tensor of packed codes";
    if (shape.size() != 2) return op_ + ": W must be 2-D (out_features, packed bytes), got shape " + Shape(shape);
    if (shape[0] < 1 || shape[1] < 1)
      return op_ + ": W must hold at least one output row of at least one byte, got shape " + Shape(shape);
    return TileWeights(w.GetTensorData<uint8_t>(), shape[0], shape[1], bits_, t);
  }

  Ort::Status Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t n_inputs = ctx.GetInputCount();
    if (n_inputs < 3 || n_inputs > 8)
      return Invalid(op_ + " takes 3 to 8 inputs (X, W, scales[, bias[, norm_weight, norm_bias[, norm2_weight, "
                           "norm2_bias]]])");
    Ort::ConstValue xv = ctx.GetInput(0);
    const auto xinfo = xv.GetTensorTypeAndShapeInfo();
    if (xinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) return Invalid(op_ + ": X must be float32");
    std::vector<int64_t> xshape = xinfo.GetShape();
    if (xshape.empty()) return Invalid(op_ + ": X must have at least one dimension (..., in_features)");
    const int64_t k = xshape.back();
    if (k < 1) return Invalid(op_ + ": X's last dimension (in_features) must be at least 1");
    // |sum_k q c| <= 127 K max_code (binary: twice that) must fit the int32 accumulators
    const int64_t k_max = INT32_MAX / (254 * ((int64_t{1} << bits_) - 1));
    if (k > k_max)
      return Invalid(op_ + ": " + std::to_string(k) + " input features are over the " + std::to_string(k_max) +
                     " whose sums this op keeps exact in int32");
    int64_t m = 1;
    for (size_t i = 0; i + 1 < xshape.size(); ++i) m *= xshape[i];

    Tiled per_call;
    const Tiled* w = &constant_;
    if (!have_constant_) {
      const std::string err = Prepare(ctx.GetInput(1), &per_call);
      if (!err.empty()) return Invalid(err);
      w = &per_call;
    }
    const int64_t need = (k * bits_ + 7) / 8;
    if (in_features_ && k != in_features_)
      return Invalid(op_ + ": X has " + std::to_string(k) + " input features, but the layer takes " +
                     std::to_string(in_features_) + " (attribute in_features)");
    if (w->row_bytes != need)
      return Invalid(op_ + ": W rows are " + std::to_string(w->row_bytes) + " bytes, but X's " +
                     std::to_string(k) + " input features need " + std::to_string(need) + " bytes at " +
                     std::to_string(bits_) + " bit(s) per weight");
    Ort::ConstValue sv = ctx.GetInput(2);
    const auto sinfo = sv.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> sshape = sinfo.GetShape();
    if (sinfo.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
        (sshape != std::vector<int64_t>{w->n} && sshape != std::vector<int64_t>{w->n, 1}))
      return Invalid(op_ + ": scales must be float32 with one value per output row, of shape (" +
                     std::to_string(w->n) + ",) or (" + std::to_string(w->n) + ", 1), got shape " + Shape(sshape));
    // The optional 1-D inputs, read straight into the Problem: bias (N), then two LayerNorms' weight
    // and bias (K).
    Problem p{};
    const struct { const char* name; int64_t len; const char* like; const float** data; } vectors[] = {
        {"bias", w->n, "", &p.bias}, {"norm_weight", k, " like X's last dimension", &p.norm_w[0]},
        {"norm_bias", k, " like X's last dimension", &p.norm_b[0]},
        {"norm2_weight", k, " like X's last dimension", &p.norm_w[1]},
        {"norm2_bias", k, " like X's last dimension", &p.norm_b[1]}};
    for (size_t i = 3; i < n_inputs; ++i) {
      Ort::ConstValue v = ctx.GetInput(i);
      if (!v) continue;
      const auto& want = vectors[i - 3];
      const auto info = v.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || info.GetShape().size() != 1 ||
          info.GetShape()[0] != want.len)
        return Invalid(op_ + ": " + want.name + " must be float32 of shape (" + std::to_string(want.len) + ",)" +
                       want.like + ", got " + Shape(info.GetShape()));
      *want.data = v.GetTensorData<float>();
    }
    if ((p.norm_w[0] == nullptr) != (p.norm_b[0] == nullptr))
      return Invalid(op_ + ": norm_weight and norm_bias come together (the input LayerNorm's weight and bias)");
    if ((p.norm_w[1] == nullptr) != (p.norm_b[1] == nullptr))
      return Invalid(op_ + ": norm2_weight and norm2_bias come together (the second LayerNorm's weight and bias)");
    if (p.norm_w[1] && !p.norm_w[0])
      return Invalid(op_ + ": norm2_weight and norm2_bias need norm_weight and norm_bias (the LayerNorm before)");
    std::vector<int64_t> yshape = xshape;
    yshape.back() = w->n;
    Ort::UnownedValue yv = ctx.GetOutput(0, yshape);
    if (m == 0) return Ort::Status(nullptr);

    p.w = w;
    p.x = xv.GetTensorData<float>();
    p.m = m;
    p.k = k;
    p.kp = w->groups * w->k_per_group();
    std::vector<int8_t> xq(static_cast<size_t>(m * p.kp));
    std::vector<float> sx(static_cast<size_t>(m));
    std::vector<int32_t> sumq(static_cast<size_t>(m));
    p.xq = xq.data();
    p.sx = sx.data();
    p.sumq = sumq.data();
    p.scales = sv.GetTensorData<float>();
    std::copy(eps_, eps_ + 2, p.eps);
    p.gelu = gelu_;
    p.y = yv.GetTensorMutableData<float>();
    p.token_blocks = (m + kTokensPerTask - 1) / kTokensPerTask;
    p.n_blocks = (w->panels + kNB - 1) / kNB;
    RunTasks(ctx, QuantizeTask, p.token_blocks, m * k <= kSerialQuantize, &p);
    void (*gemm)(void*, size_t) = bits_ == 8 ? GemmTask<8> : bits_ == 4 ? GemmTask<4> : bits_ == 2 ? GemmTask<2>
                                                                                                 : GemmTask<1>;
    RunTasks(ctx, gemm, p.token_blocks * p.n_blocks, m * k * w->n <= kSerialMacs, &p);
    return Ort::Status(nullptr);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      return Compute(context).release();
    } catch (const Ort::Exception& e) {
      return Ort::Status(e).release();
    } catch (const std::exception& e) {
      return Ort::Status((op_ + ": " + e.what()).c_str(), ORT_FAIL).release();
    }
  }

  std::string op_;
  int bits_;
  float eps_[2];
  int64_t in_features_ = 0;  // 0: not given
  bool gelu_ = false;
  Tiled constant_;
  bool have_constant_ = false;
};

template <int BITS>
struct PackedLinearOp : Ort::CustomOpBase<PackedLinearOp<BITS>, PackedLinearKernel, true> {
  static constexpr const char* kName = BITS == 8   ? "Int8Linear"
                                       : BITS == 4 ? "Int4Linear"
                                       : BITS == 2 ? "TernaryLinear"
                                                   : "BinaryLinear";

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new PackedLinearKernel(kName, BITS, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::Status(e).release();
    } catch (const std::exception& e) {
      return Ort::Status(e).release();
    }
  }
  const char* GetName() const { return kName; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" {

// Which kernel this build runs: "avx512-vnni", "avx2" or "portable".
__attribute__((visibility("default"))) const char* bitvit_ops_isa() { return BITVIT_ISA; }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // an ONNX Runtime older than the headers: report it through its first API version
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string("bitvit's op library was built for ONNX Runtime's C API version ") +
                            std::to_string(ORT_API_VERSION) + ", which this ONNX Runtime (" +
                            api_base->GetVersionString() +
                            ") does not serve; rebuild it against this runtime's headers";
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  // One domain per process, added to every session that registers the library.
  static PackedLinearOp<2> ternary;
  static PackedLinearOp<1> binary;
  static PackedLinearOp<4> int4;
  static PackedLinearOp<8> int8;
  static std::once_flag once;
  static Ort::CustomOpDomain* domain = nullptr;
  try {
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain("bitvit");
      domain->Add(&ternary);
      domain->Add(&binary);
      domain->Add(&int4);
      domain->Add(&int8);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const std::exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}

}  // extern "C"
