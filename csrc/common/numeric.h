/* Element types, conversions, 16-byte vector moves, alignment checks and fast integer
 * division, shared by the kernels of csrc/ -- written once for the device (nvcc) and for the host
 * (g++: the CPU test builds run the same per-thread code on CPU memory, see
 * tests/test_csrc_hilo.py).
 *
 * C++ only. Under nvcc the 16-bit types are CUDA's __half / __nv_bfloat16; in a host-only build
 * (no CUDA headers at all) they are 2-byte structs with software round-to-nearest-even
 * conversions that match the hardware's (tests compare them with torch's). */
#ifndef VITKERN_COMMON_NUMERIC_H_
#define VITKERN_COMMON_NUMERIC_H_

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define VK_HDI __host__ __device__ __forceinline__
#define VK_UNROLL _Pragma("unroll")
#else
#include <stdexcept>  /* vk::MisalignedAccess of the host build's alignment checks */
#define VK_HDI inline
#define VK_UNROLL
#endif

namespace vk {

/* x rounded up to a multiple of a (a > 0; x >= 0). */
VK_HDI constexpr int64_t align_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

/* ---------------------------------------------------------------------------------------- */
/* alignment checks of the host build                                                         */
/* ---------------------------------------------------------------------------------------- */
/* A GPU faults (cudaErrorMisalignedAddress) on an 8- or 16-byte vector load / store whose address
 * is not a multiple of its width (wmma tiles: 32 bytes); a CPU does not care, so the CPU test
 * builds would run a misaligned layout without noticing. In those builds (no nvcc: the kernels'
 * headers reach the host compiler only in tests/csrc/hilo_host.cpp and window_host.cpp) every
 * vector move below and every shared-memory region the per-thread programs compute checks its
 * alignment and throws vk::MisalignedAccess, which the test builds' entry points return as
 * VK_STATUS_MISALIGNED with the message. Under nvcc the checks compile to nothing: the device
 * code is unchanged. Any new vector access (8 or 16 bytes, global or shared) must check too.
 *
 *   VK_ASSERT_ALIGNED(ptr, width, what)   address of ptr (global, shared or local) % width == 0
 *   VK_ASSERT_SMEM_ALIGNED(base, ptr, width, what)
 *                                         (ptr - base) % width == 0 for a region or row of the
 *                                         shared memory at `base` (a block's dynamic shared
 *                                         memory: its base is aligned, so on the GPU only these
 *                                         offsets decide the alignment) */
#if defined(__CUDACC__)
#define VK_ALIGN_CHECKS 0
#define VK_ASSERT_ALIGNED(ptr, width, what) ((void)0)
#define VK_ASSERT_SMEM_ALIGNED(base, ptr, width, what) ((void)0)
#else
#define VK_ALIGN_CHECKS 1

struct MisalignedAccess : std::runtime_error {
  explicit MisalignedAccess(const char* msg) : std::runtime_error(msg) {}
};

[[noreturn]] inline void misaligned(const char* what, const char* kind, uint64_t value, int width,
                                    const char* file, int line) {
  const char* base = file;  /* the file name only: the message must fit a 256-byte `why` */
  for (const char* c = file; *c; ++c) {
    if (*c == '/' || *c == '\\') base = c + 1;
  }
  char buf[256];
  snprintf(buf, sizeof buf, "misaligned %s: %s %llu is %llu mod %d (needs %d-byte alignment) "
           "[%s:%d]", what, kind, (unsigned long long)value,
           (unsigned long long)(value % (uint64_t)width), width, width, base, line);
  throw MisalignedAccess(buf);
}

inline void check_aligned(const void* ptr, int width, const char* what, const char* file,
                          int line) {
  const uintptr_t a = (uintptr_t)ptr;
  if (a % (uintptr_t)width != 0) misaligned(what, "address", a, width, file, line);
}

inline void check_smem_aligned(const void* base, const void* ptr, int width, const char* what,
                               const char* file, int line) {
  const intptr_t off = (const unsigned char*)ptr - (const unsigned char*)base;
  if (off < 0 || off % width != 0) {
    misaligned(what, "shared-memory byte offset", (uint64_t)off, width, file, line);
  }
}

#define VK_ASSERT_ALIGNED(ptr, width, what) \
  ::vk::check_aligned((const void*)(ptr), (width), (what), __FILE__, __LINE__)
#define VK_ASSERT_SMEM_ALIGNED(base, ptr, width, what) \
  ::vk::check_smem_aligned((const void*)(base), (const void*)(ptr), (width), (what), __FILE__, \
                           __LINE__)
#endif

#if defined(__CUDACC__)
typedef __half half_t;
typedef __nv_bfloat16 bf16_t;
VK_HDI float to_float(half_t x) { return __half2float(x); }
VK_HDI float to_float(bf16_t x) { return __bfloat162float(x); }
#else
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline float to_float(half_t h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  if (exp == 0) {  /* zero or subnormal: mant * 2^-24, exact in float */
    return bits_float(sign | float_bits((float)mant * 5.9604644775390625e-8f));
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}
inline float to_float(bf16_t b) { return bits_float((uint32_t)b.bits << 16); }

/* float -> half, round to nearest even (subnormals, overflow to inf, NaN kept quiet). */
inline half_t half_from_float(float f) {
  const uint32_t f16max = (127u + 16u) << 23;                      /* 65536.0f */
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = float_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint16_t o;
  if (u >= f16max) {
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  /* result is subnormal or zero: let the FPU round */
    o = (uint16_t)(float_bits(bits_float(u) + bits_float(denorm_magic)) - denorm_magic);
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
    o = (uint16_t)(u >> 13);
  }
  half_t h;
  h.bits = (uint16_t)(o | (sign >> 16));
  return h;
}

inline bf16_t bf16_from_float(float f) {
  const uint32_t u = float_bits(f);
  bf16_t b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = (uint16_t)((u >> 16) | 0x40u);  /* quiet NaN */
  } else {
    b.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
#endif

VK_HDI float to_float(float x) { return x; }

template <class T> VK_HDI T from_float(float x);
template <> VK_HDI float from_float<float>(float x) { return x; }
#if defined(__CUDACC__)
template <> VK_HDI half_t from_float<half_t>(float x) { return __float2half_rn(x); }
template <> VK_HDI bf16_t from_float<bf16_t>(float x) { return __float2bfloat16_rn(x); }
#else
template <> inline half_t from_float<half_t>(float x) { return half_from_float(x); }
template <> inline bf16_t from_float<bf16_t>(float x) { return bf16_from_float(x); }
#endif

/* 1/x for x in [1, 2^126) (a softmax denominator, >= 1): the MUFU reciprocal (2 ulp), no call
 * into the IEEE division slow path (whose call ABI costs registers and a stack frame). */
VK_HDI float rcp_normal(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, x);
#else
  return 1.0f / x;
#endif
}

/* Elements per 16-byte vector: 8 for 16-bit types, 4 for fp32. */
template <class T> struct Vec { static constexpr int kElems = 16 / (int)sizeof(T); };

/* Raw 16-byte copy between 16-byte aligned addresses (global or shared memory). */
template <class T>
VK_HDI void copy16(T* dst, const T* src) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  VK_ASSERT_ALIGNED(dst, 16, "16-byte vector store (copy16)");
  VK_ASSERT_ALIGNED(src, 16, "16-byte vector load (copy16)");
  memcpy(dst, src, 16);
#endif
}

/* The Vec<T>::kElems elements at src (16-byte aligned) as floats. */
template <class T>
VK_HDI void load16_float(const T* src, float* out) {
  constexpr int n = Vec<T>::kElems;
#if defined(__CUDA_ARCH__)
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#else
  VK_ASSERT_ALIGNED(src, 16, "16-byte vector load (load16_float)");
  T e[n];
  memcpy(e, src, 16);
#endif
VK_UNROLL
  for (int i = 0; i < n; ++i) out[i] = to_float(e[i]);
}

/* One chunk of Vec<T>::kElems consecutive channels of a token: one 16-byte move when `vec`
 * (unit channel stride, aligned), else element by element through the channel stride. */
template <class T>
VK_HDI void gather_chunk(T* dst /* contiguous, 16-byte aligned */, const T* src, int64_t sd,
                         bool vec) {
  constexpr int n = Vec<T>::kElems;
  if (vec) {
    copy16(dst, src);
  } else {
VK_UNROLL
    for (int i = 0; i < n; ++i) dst[i] = src[(int64_t)i * sd];
  }
}

template <class T>
VK_HDI void load_chunk_float(const T* src, int64_t sd, bool vec, float* out) {
  constexpr int n = Vec<T>::kElems;
  if (vec) {
    load16_float(src, out);
  } else {
VK_UNROLL
    for (int i = 0; i < n; ++i) out[i] = to_float(src[(int64_t)i * sd]);
  }
}

template <class T>
VK_HDI void store_chunk_float(T* dst, int64_t sd, bool vec, const float* in) {
  constexpr int n = Vec<T>::kElems;
  alignas(16) T e[n];  /* aligned: moved as one 16-byte vector below */
VK_UNROLL
  for (int i = 0; i < n; ++i) e[i] = from_float<T>(in[i]);
  if (vec) {
    copy16(dst, e);
  } else {
VK_UNROLL
    for (int i = 0; i < n; ++i) dst[(int64_t)i * sd] = e[i];
  }
}

template <class T>
VK_HDI void zero_chunk(T* dst /* contiguous, aligned */) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
#else
  VK_ASSERT_ALIGNED(dst, 16, "16-byte vector store (zero_chunk)");
  memset(dst, 0, 16);  /* +0.0 is all-zero bits in every supported type */
#endif
}

/* Division by a runtime-invariant divisor for dividends < 2^31 (Granlund-Montgomery: a
 * multiply-high and a shift instead of a ~20-instruction integer division). Built on the host. */
struct FastDiv {
  uint32_t divisor, multiplier, shift;
};

inline FastDiv make_fastdiv(uint32_t d) {
  FastDiv f;
  f.divisor = d;
  f.multiplier = 0;
  f.shift = 0;
  if (d > 1) {
    uint32_t l = 0;
    while ((1ull << l) < d) ++l;  /* ceil(log2 d) */
    const uint64_t p = 31u + l;
    f.multiplier = (uint32_t)(((1ull << p) + d - 1) / d);
    f.shift = (uint32_t)(p - 32);
  }
  return f;
}

VK_HDI uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

/* n / f.divisor for n < 2^31. */
VK_HDI uint32_t fastdiv(uint32_t n, FastDiv f) {
  return f.divisor == 1 ? n : (umulhi32(n, f.multiplier) >> f.shift);
}

}  // namespace vk

#endif /* VITKERN_COMMON_NUMERIC_H_ */
