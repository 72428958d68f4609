// AVX2 + FMA generator of the smoothing noise's standard normals (robustkern/reference/smoothing.py): for
// block j (elements 4j .. 4j + 3),
//
//   (o0, o1, o2, o3) = Philox4x32-10(counter = (j, c1, c2, c3), key = (k0, k1)),  U(o) = (o + 1/2) 2^-32
//   rho_A = sqrt(-2 log U(o0)), theta_A = fl(2 pi U(o1)); rho_B, theta_B from (o2, o3)        (float64)
//   z[4j .. 4j + 3] = fp32(rho_A cos theta_A, rho_A sin theta_A, rho_B cos theta_B, rho_B sin theta_B)
//
// Eight blocks per Philox step (8 uint32 lanes; 32x32->64-bit products with vpmuludq on the even and the odd
// lanes), then Box-Muller on 4 float64 lanes with this file's own float64 log and sin/cos. The reference
// calls ATen's float64 log/cos/sin (MKL VML, SLEEF or glibc, depending on the build and on where an element
// falls in the tensor), all within an ulp of the exact value; the functions here are too (see below), so
// after the final rounding to fp32 the results agree except when the float64 value lies within a couple of
// float64 ulps of an fp32 rounding boundary (probability ~1e-8 per element; tests/test_smoothing_ops.py
// compares millions of elements).
//
//   log(x): x = 2^k m with m in [sqrt(1/2), sqrt(2)), f = m - 1 (exact), s = f / (2 + f),
//           log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), R the degree-14 even minimax polynomial of
//           fdlibm's e_log.c (Sun Microsystems, freely redistributable; its coefficients Lg1..Lg7), error
//           below 1 ulp; k ln 2 in two parts (ln2_hi has trailing zeros, so k * ln2_hi is exact).
//   sin/cos(a), a = fl(2 pi U) in (0, 2 pi): q = rint(a * 2/pi) in {0..4}, r = a - q pi/2 with pi/2 in three
//           float64 parts by FMA (the first step is exact: a - q P1 is a multiple of 2^-52 below 1), then the
//           fdlibm k_sin.c / k_cos.c polynomials on [-pi/4, pi/4] (S1..S6, C1..C6; error below 1 ulp) and the
//           quadrant's sign / swap.
//
// Compiled for AVX2 + FMA by function attributes and used only when the CPU has both
// (robustkern::smoothing_detail::have_avx2_fma); other CPUs keep the portable path of smoothing_cpu.cpp.
// The fp32 epilogue (x + sigma z, normalisation, cast) stays in smoothing_cpu.cpp, compiled without FMA, so
// that the product and the sum round separately as in the reference.
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RK_HAVE_X86 1
#else
#define RK_HAVE_X86 0
#endif

namespace robustkern {
namespace smoothing_detail {

#if RK_HAVE_X86 && defined(__GNUC__)

bool have_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

#define RK_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

namespace {

constexpr uint32_t kM0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments
constexpr uint32_t kW1 = 0xBB67AE85u;

// (hi, lo) 32-bit halves of m * a on 8 uint32 lanes (m broadcast in every 64-bit lane's low word)
RK_AVX2 void mulhilo(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i pe = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// z a + b with the constants a, b broadcast (one Horner step)
RK_AVX2 __m256d fma_c(__m256d z, double a, double b) {
  return _mm256_fmadd_pd(z, _mm256_set1_pd(a), _mm256_set1_pd(b));
}

// (o + 1/2) 2^-32 in float64 for 4 uint32 lanes (exact)
RK_AVX2 __m256d unit_open(__m128i o) {
  __m256d d = _mm256_cvtepi32_pd(_mm_xor_si128(o, _mm_set1_epi32(INT32_MIN)));  // o - 2^31
  d = _mm256_add_pd(d, _mm256_set1_pd(2147483648.5));                          // o + 1/2 (exact)
  return _mm256_mul_pd(d, _mm256_set1_pd(1.0 / 4294967296.0));
}

// natural log of 4 positive normal float64 values (fdlibm's method, see the file comment)
RK_AVX2 __m256d log_pd(__m256d x) {
  const __m256i bits = _mm256_castpd_si256(x);
  const __m256i mant = _mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL));
  __m256d m = _mm256_castsi256_pd(_mm256_or_si256(mant, _mm256_set1_epi64x(0x3FF0000000000000LL)));  // [1, 2)
  // biased exponent as a double: (e | 2^52 bits) - 2^52
  const __m256i e = _mm256_srli_epi64(bits, 52);
  __m256d k = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(e, _mm256_set1_epi64x(0x4330000000000000LL))),
                            _mm256_set1_pd(4503599627370496.0 + 1023.0));
  const __m256d big = _mm256_cmp_pd(m, _mm256_set1_pd(1.4142135623730951), _CMP_GT_OQ);
  m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), big);
  k = _mm256_add_pd(k, _mm256_and_pd(big, _mm256_set1_pd(1.0)));
  const __m256d f = _mm256_sub_pd(m, _mm256_set1_pd(1.0));
  const __m256d s = _mm256_div_pd(f, _mm256_add_pd(_mm256_set1_pd(2.0), f));
  const __m256d z = _mm256_mul_pd(s, s);
  const __m256d w = _mm256_mul_pd(z, z);
  __m256d t1 = fma_c(w, 1.531383769920937332e-01, 2.222219843214978396e-01);
  t1 = _mm256_fmadd_pd(w, t1, _mm256_set1_pd(3.999999999940941908e-01));
  t1 = _mm256_mul_pd(w, t1);
  __m256d t2 = fma_c(w, 1.479819860511658591e-01, 1.818357216161805012e-01);
  t2 = _mm256_fmadd_pd(w, t2, _mm256_set1_pd(2.857142874366239149e-01));
  t2 = _mm256_fmadd_pd(w, t2, _mm256_set1_pd(6.666666666666735130e-01));
  t2 = _mm256_mul_pd(z, t2);
  const __m256d R = _mm256_add_pd(t2, t1);
  const __m256d hfsq = _mm256_mul_pd(_mm256_mul_pd(_mm256_set1_pd(0.5), f), f);
  // k ln2_hi - ((hfsq - (s (hfsq + R) + k ln2_lo)) - f)
  const __m256d k_ln2_lo = _mm256_mul_pd(k, _mm256_set1_pd(1.90821492927058770002e-10));
  const __m256d inner = _mm256_fmadd_pd(s, _mm256_add_pd(hfsq, R), k_ln2_lo);
  const __m256d low = _mm256_sub_pd(_mm256_sub_pd(hfsq, inner), f);
  return _mm256_sub_pd(_mm256_mul_pd(k, _mm256_set1_pd(6.93147180369123816490e-01)), low);
}

// cos and sin of 4 float64 values in [0, 2 pi] (see the file comment)
RK_AVX2 void sincos_pd(__m256d a, __m256d& cos_a, __m256d& sin_a) {
  const __m256d q = _mm256_round_pd(_mm256_mul_pd(a, _mm256_set1_pd(0.6366197723675814)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256d nq = _mm256_sub_pd(_mm256_setzero_pd(), q);
  __m256d r = _mm256_fmadd_pd(nq, _mm256_set1_pd(1.5707963267948966), a);
  r = _mm256_fmadd_pd(nq, _mm256_set1_pd(6.123233995736766e-17), r);
  r = _mm256_fmadd_pd(nq, _mm256_set1_pd(-1.4973849048591698e-33), r);
  const __m256d z = _mm256_mul_pd(r, r);
  const __m256d w = _mm256_mul_pd(z, z);
  // cos(r) = (1 - z/2) + (((1 - (1 - z/2)) - z/2) + z^2 C(z))
  __m256d c = fma_c(z, -1.13596475577881948265e-11, 2.08757232129817482790e-09);
  c = _mm256_fmadd_pd(z, c, _mm256_set1_pd(-2.75573143513906633035e-07));
  __m256d c0 = fma_c(z, 2.48015872894767294178e-05, -1.38888888888741095749e-03);
  c0 = _mm256_fmadd_pd(z, c0, _mm256_set1_pd(4.16666666666666019037e-02));
  const __m256d cr = _mm256_fmadd_pd(_mm256_mul_pd(w, w), c, _mm256_mul_pd(z, c0));
  const __m256d hz = _mm256_mul_pd(_mm256_set1_pd(0.5), z);
  const __m256d one = _mm256_set1_pd(1.0);
  const __m256d wc = _mm256_sub_pd(one, hz);
  const __m256d cosr = _mm256_add_pd(wc, _mm256_fmadd_pd(z, cr, _mm256_sub_pd(_mm256_sub_pd(one, wc), hz)));
  // sin(r) = r + r^3 (S1 + z S(z))
  const __m256d s = fma_c(z, 1.58969099521155010221e-10, -2.50507602534068634195e-08);
  __m256d s0 = fma_c(z, 2.75573137070700676789e-06, -1.98412698298579493134e-04);
  s0 = _mm256_fmadd_pd(z, s0, _mm256_set1_pd(8.33333333332248946124e-03));
  const __m256d sr = _mm256_fmadd_pd(_mm256_mul_pd(z, w), s, s0);
  const __m256d v = _mm256_mul_pd(z, r);
  const __m256d sinr = _mm256_fmadd_pd(v, _mm256_fmadd_pd(z, sr, _mm256_set1_pd(-1.66666666666666324348e-01)), r);
  // quadrant q: cos a = (cos r, -sin r, -cos r, sin r, cos r)[q], sin a = (sin r, cos r, -sin r, -cos r, sin r)[q]
  const __m128i qi = _mm256_cvtpd_epi32(q);
  const __m256i odd = _mm256_cvtepi32_epi64(_mm_and_si128(qi, _mm_set1_epi32(1)));
  const __m256i neg_c = _mm256_cvtepi32_epi64(_mm_and_si128(_mm_add_epi32(qi, _mm_set1_epi32(1)), _mm_set1_epi32(2)));
  const __m256i neg_s = _mm256_cvtepi32_epi64(_mm_and_si128(qi, _mm_set1_epi32(2)));
  const __m256d pick = _mm256_castsi256_pd(_mm256_cmpeq_epi64(odd, _mm256_set1_epi64x(1)));
  cos_a = _mm256_xor_pd(_mm256_blendv_pd(cosr, sinr, pick), _mm256_castsi256_pd(_mm256_slli_epi64(neg_c, 62)));
  sin_a = _mm256_xor_pd(_mm256_blendv_pd(sinr, cosr, pick), _mm256_castsi256_pd(_mm256_slli_epi64(neg_s, 62)));
}

// the two fp32 normals (rho cos theta, rho sin theta) of 4 (o_rho, o_theta) pairs
RK_AVX2 void box_muller(__m128i o_rho, __m128i o_theta, __m128& zc, __m128& zs) {
  const __m256d rho = _mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), log_pd(unit_open(o_rho))));
  __m256d c, s;
  sincos_pd(_mm256_mul_pd(_mm256_set1_pd(6.283185307179586), unit_open(o_theta)), c, s);
  zc = _mm256_cvtpd_ps(_mm256_mul_pd(rho, c));
  zs = _mm256_cvtpd_ps(_mm256_mul_pd(rho, s));
}

RK_AVX2 void philox8(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, const __m256i* k0v, const __m256i* k1v,
                     __m256i m0, __m256i m1) {
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, hi0, lo0);
    mulhilo(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0v[round]);
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1v[round]);
    c3 = lo0;
  }
}

}  // namespace

// Two passes over the chunk (Philox into o0..o3, then Box-Muller), each a loop of independent iterations, so
// that out-of-order execution overlaps the long dependency chains (10 Philox rounds; division and sqrt).
__attribute__((target("avx2,fma"))) void normal_chunk_avx2(uint32_t e0, int64_t n, uint32_t c1_, uint32_t c2_,
                                                            uint32_t c3_, uint32_t key0, uint32_t key1, float* z) {
  constexpr int64_t kBlocks = 128;  // Philox blocks per pass (512 elements)
  alignas(32) uint32_t o[4][kBlocks];
  const __m256i m0 = _mm256_set1_epi64x(kM0), m1 = _mm256_set1_epi64x(kM1);
  __m256i k0v[10], k1v[10];
  uint32_t k0 = key0, k1 = key1;
  for (int round = 0; round < 10; ++round, k0 += kW0, k1 += kW1) {
    k0v[round] = _mm256_set1_epi32(static_cast<int>(k0));
    k1v[round] = _mm256_set1_epi32(static_cast<int>(k1));
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  const uint32_t block0 = e0 >> 2;  // e0 is a multiple of 4
  const int64_t blocks = (n + 3) >> 2;
  for (int64_t j0 = 0; j0 < blocks; j0 += kBlocks) {
    const int64_t nb = blocks - j0 < kBlocks ? blocks - j0 : kBlocks;
    __m256i ctr = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(block0 + static_cast<uint32_t>(j0))), lane);
    for (int64_t i = 0; i < nb; i += 16) {
      __m256i a0 = ctr, a1 = _mm256_set1_epi32(static_cast<int>(c1_));
      __m256i a2 = _mm256_set1_epi32(static_cast<int>(c2_)), a3 = _mm256_set1_epi32(static_cast<int>(c3_));
      ctr = _mm256_add_epi32(ctr, eight);
      __m256i b0 = ctr, b1 = a1, b2 = a2, b3 = a3;
      ctr = _mm256_add_epi32(ctr, eight);
      philox8(a0, a1, a2, a3, k0v, k1v, m0, m1);
      philox8(b0, b1, b2, b3, k0v, k1v, m0, m1);
      const __m256i words[8] = {a0, a1, a2, a3, b0, b1, b2, b3};
      for (int w = 0; w < 4; ++w) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(o[w] + i), words[w]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(o[w] + i + 8), words[4 + w]);
      }
    }
    float* zb = z + 4 * j0;
    for (int64_t i = 0; i < nb; i += 4) {  // 4 blocks: 16 elements
      __m128 ca, sa, cb, sb;
      box_muller(_mm_load_si128(reinterpret_cast<const __m128i*>(o[0] + i)),
                 _mm_load_si128(reinterpret_cast<const __m128i*>(o[1] + i)), ca, sa);
      box_muller(_mm_load_si128(reinterpret_cast<const __m128i*>(o[2] + i)),
                 _mm_load_si128(reinterpret_cast<const __m128i*>(o[3] + i)), cb, sb);
      _MM_TRANSPOSE4_PS(ca, sa, cb, sb);  // rows: block i, i+1, i+2, i+3 = (cos A, sin A, cos B, sin B)
      _mm_storeu_ps(zb + 4 * i, ca);
      _mm_storeu_ps(zb + 4 * i + 4, sa);
      _mm_storeu_ps(zb + 4 * i + 8, cb);
      _mm_storeu_ps(zb + 4 * i + 12, sb);
    }
  }
}

#else  // not x86-64 with GCC/Clang: the portable path only

bool have_avx2_fma() { return false; }
void normal_chunk_avx2(uint32_t, int64_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, float*) {}

#endif

}  // namespace smoothing_detail
}  // namespace robustkern
