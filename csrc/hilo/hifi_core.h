/* HiLo Hi-Fi attention (softmax inside non-overlapping s×s windows, s <= 4): the per-thread
 * program of the CUDA kernels in hifi.cu, written as __host__ __device__ phases so that the CPU
 * test build (tests/csrc/hilo_host.cpp, driven by tests/test_csrc_hilo.py) runs exactly this
 * code -- argument checks, launch geometry, index math, zero padding, softmax and its gradient --
 * against vitkern.reference on the CPU. Only the glue in hifi.cu (barriers, the warp-shuffle sum
 * of the per-lane partial dot products, the launch) is GPU-only.
 *
 * Thread layout. A window of nk = s² tokens is served by nk · L threads: L "lanes" per token
 * (L a power of two <= 8, contiguous and L-aligned inside a warp), lane l owning the 16-byte
 * channel vectors l, l + L, l + 2L, ... (nv = d / (VEC · L) of them; VEC = 8 for 16-bit types,
 * 4 for fp32), so every global access of a token row is L consecutive 16-byte vectors: q, k, v
 * are read exactly once, o (dq, dk, dv) written exactly once. Many windows share a block
 * (about 256 threads): 16 windows per block for s = 2, d = 32, fp16.
 *
 * Forward, per block:  stage k, v of its windows in shared memory (raw dtype)  | barrier |
 *   scores:  partial q_i·k_j over the lane's channels (q read from global), summed over the L
 *            lanes (shuffles), scaled, fp32 softmax in registers;
 *   output:  o_i = Σ_j p_ij v_j over the lane's channels, written once.
 * Backward (scores recomputed; no saved o or log-sum-exp needed: the window is tiny):
 *   stage q, k, v, dO  | barrier |  s_ij, dp_ij = dO_i·v_j (lane partials, summed), p = softmax,
 *   Δ_i = Σ_j p_ij dp_ij, ds_ij = p_ij (dp_ij - Δ_i); dq_i = scale Σ_j ds_ij k_j written; p, ds
 *   rows to shared memory  | barrier |  dk_j = scale Σ_i ds_ij q_i, dv_j = Σ_i p_ij dO_i written.
 *
 * Zero padding (pad="zero", LITv2 detection): the window grid is ceil(H/s) × ceil(W/s); tokens
 * outside the map are unmasked keys / values equal to zero; their queries are not computed
 * into any output and their dk, dv are not stored (they are not inputs).
 *
 * Element offsets are int64 everywhere (B·heads·N·d passes 2^31); window / thread index math is
 * 32-bit with precomputed fast division (launches of 2^31 windows or more are refused).
 */
#ifndef VITKERN_HILO_HIFI_CORE_H_
#define VITKERN_HILO_HIFI_CORE_H_

#include <math.h>
#include <stdio.h>

#include "common.h"
#include "common/args.h"
#include "common/numeric.h"

namespace vk {
namespace hifi {

enum TensorSlot { kQ = 0, kK, kV, kO, kDO, kDQ, kDK, kDV, kNumSlots };

constexpr int kMaxS = 4;
constexpr int kMaxNK = kMaxS * kMaxS;
constexpr int kMaxLanes = 8;          /* lanes per token: at most 3 shuffle steps per sum */
constexpr int kMaxHeadDim = 256;
constexpr int kTargetBlockThreads = 256;
constexpr int64_t kSmemLimit = 48 * 1024;  /* static limit: no opt-in attribute needed */

/* Alignment of each window's shared-memory region: its arrays are moved in 16-byte vectors
 * (copy16, zero_chunk, load16_float), so window w_local must start at a multiple of 16 bytes.
 * VK_TEST_HIFI_WINDOW_ALIGN plants another value in the CPU test build only (1: the unrounded
 * size of issue 13, which put every odd window of s = 1, 3 backward blocks 8 bytes off), to prove
 * that the host build's alignment checks catch a misaligned layout. */
#if defined(VK_TEST_HIFI_WINDOW_ALIGN)
#if defined(__CUDACC__)
#error "VK_TEST_HIFI_WINDOW_ALIGN is a CPU test-build switch"
#endif
constexpr int64_t kWindowAlign = VK_TEST_HIFI_WINDOW_ALIGN;
#else
constexpr int64_t kWindowAlign = 16;
#endif

/* Everything a kernel needs, by value (a few hundred bytes of kernel parameters). */
struct Params {
  void* ptr[kNumSlots];
  int64_t stride[kNumSlots][4];  /* (B, heads, N, d) strides in elements */
  int64_t B, heads, H, W, gh, gw, n_windows;
  int32_t s, nk, d, vec, lanes, log2_lanes, nv;
  int32_t win_threads, wpb, block_threads;
  FastDiv div_win_threads, div_map, div_gw, div_heads;
  uint32_t vec_mask;             /* bit slot: 16-byte vector access is legal for that tensor */
  int32_t dtype, backward;
  int64_t smem_per_window, smem_bytes, grid;
  float scale, scale_log2;
};

/* ---------------------------------------------------------------------------------------- */
/* host: validation and launch geometry (shared by the CUDA launcher and the CPU test build)  */
/* ---------------------------------------------------------------------------------------- */

/* Shared-memory bytes of one window (see smem_tensor / smem_rows): 2 (forward: k, v) or 4
 * (backward: q, k, v, dO) [nk][d] arrays of the dtype, then (backward) the fp32 p and ds rows
 * [nk][nk], rounded up to kWindowAlign: the next window of the block starts aligned (nk = 1, 9
 * make the rows an odd multiple of 8 bytes). The one formula of supported() and make_params(). */
inline int64_t window_smem_bytes(int backward, int64_t nk, int64_t d, int64_t esize) {
  const int64_t arrays = (backward ? 4 : 2) * nk * d * esize;
  const int64_t rows = backward ? 2 * nk * nk * 4 : 0;
  return align_up(arrays + rows, kWindowAlign);
}

/* Shape-class check: can the kernels take (dtype, head_dim, window_size)? Fills `why`. */
inline vitkern_status supported(int32_t dtype, int64_t d, int64_t s, int backward, char* why,
                                size_t n) {
  char buf[256];
  const int64_t esize = vk_dtype_size(dtype);
  if (esize == 0) return fail(why, n, VK_STATUS_UNSUPPORTED_DTYPE, "dtype not float32/float16/bfloat16");
  if (s < 1 || s > kMaxS) {
    snprintf(buf, sizeof buf, "window_size %lld > %d: the CUDA Hi-Fi kernels hold a window's "
             "scores in registers (s <= 4)", (long long)s, kMaxS);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  const int64_t vec = 16 / esize;
  if (d < 1 || d > kMaxHeadDim || d % vec) {
    snprintf(buf, sizeof buf, "head_dim %lld not supported by the CUDA Hi-Fi kernels (%s: "
             "multiples of %lld up to %d)", (long long)d, vk_dtype_name(dtype), (long long)vec,
             kMaxHeadDim);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  const int64_t nk = s * s;
  const int64_t smem = window_smem_bytes(backward, nk, d, esize);
  if (smem > kSmemLimit) {
    snprintf(buf, sizeof buf, "head_dim %lld with window_size %lld needs %lld B of shared memory "
             "per window (> %lld) in the CUDA Hi-Fi %s kernel", (long long)d, (long long)s,
             (long long)smem, (long long)kSmemLimit, backward ? "backward" : "forward");
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  return VK_STATUS_SUCCESS;
}

/* Validate descriptors and build the launch parameters.
 * Forward: t = {q, k, v, o}; backward: t = {q, k, v, do, dq, dk, dv} (all (B, heads, H·W, d),
 * one dtype). Returns a status and, on failure, a reason in `why`. */
inline vitkern_status make_params(Params* p, const vitkern_tensor* const* t, int backward,
                                  int64_t H, int64_t W, int64_t s, float scale, char* why,
                                  size_t n) {
  char buf[256];
  memset(p, 0, sizeof(*p));
  static const int fwd_slots[] = {kQ, kK, kV, kO};
  static const int bwd_slots[] = {kQ, kK, kV, kDO, kDQ, kDK, kDV};
  const int* slots = backward ? bwd_slots : fwd_slots;
  const int count = backward ? 7 : 4;
  VK_CHECK(check_descriptors(t, count, why, n));
  for (int i = 0; i < count; ++i) {
    for (int k = 0; k < VK_MAX_DIMS; ++k) {
      if (t[i]->sizes[k] != t[0]->sizes[k]) {
        return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "q, k, v and outputs must share one shape");
      }
    }
  }
  const int64_t B = t[0]->sizes[0], heads = t[0]->sizes[1], N = t[0]->sizes[2], d = t[0]->sizes[3];
  if (H < 1 || W < 1 || H * W != N) {
    snprintf(buf, sizeof buf, "hw=(%lld, %lld) does not match N=%lld", (long long)H, (long long)W,
             (long long)N);
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, buf);
  }
  const vitkern_status st = supported(t[0]->dtype, d, s, backward, why, n);
  if (st != VK_STATUS_SUCCESS) return st;
  if (!(scale == scale) || scale == INFINITY || scale == -INFINITY) {
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "scale must be finite");
  }

  const int64_t esize = vk_dtype_size(t[0]->dtype);
  p->dtype = t[0]->dtype;
  p->backward = backward;
  p->B = B;
  p->heads = heads;
  p->H = H;
  p->W = W;
  p->s = (int32_t)s;
  p->nk = (int32_t)(s * s);
  p->d = (int32_t)d;
  p->vec = (int32_t)(16 / esize);
  p->gh = vk_cdiv(H, s);
  p->gw = vk_cdiv(W, s);
  p->n_windows = B * heads * p->gh * p->gw;
  const int64_t nvec = d / p->vec;
  int32_t lanes = 1, log2_lanes = 0;
  while (lanes < kMaxLanes && nvec % (2 * lanes) == 0) {
    lanes *= 2;
    ++log2_lanes;
  }
  p->lanes = lanes;
  p->log2_lanes = log2_lanes;
  p->nv = (int32_t)(nvec / lanes);
  p->win_threads = p->nk * lanes;
  p->smem_per_window = window_smem_bytes(backward, p->nk, d, esize);
  int64_t wpb = kTargetBlockThreads / p->win_threads;
  if (wpb < 1) wpb = 1;
  while (wpb > 1 && wpb * p->smem_per_window > kSmemLimit) --wpb;
  p->wpb = (int32_t)wpb;
  p->block_threads = (int32_t)(vk_cdiv(wpb * p->win_threads, 32) * 32);
  p->smem_bytes = wpb * p->smem_per_window;
  p->grid = vk_cdiv(p->n_windows, wpb);
  /* Window / thread indices are 32-bit (fast division, no 64-bit division subroutine in the
   * kernels); only the element offsets need 64 bits. 2^31 windows are far beyond any memory. */
  if (p->n_windows >= 0x7fffffffLL || p->grid * p->block_threads >= 0x7fffffffLL) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE,
                "more than 2^31 windows in one launch: split the batch");
  }
  p->div_win_threads = make_fastdiv((uint32_t)p->win_threads);
  p->div_map = make_fastdiv((uint32_t)(p->gh * p->gw > 0 ? p->gh * p->gw : 1));
  p->div_gw = make_fastdiv((uint32_t)(p->gw > 0 ? p->gw : 1));
  p->div_heads = make_fastdiv((uint32_t)(heads > 0 ? heads : 1));
  p->scale = scale;
  p->scale_log2 = scale * 1.4426950408889634f;
  for (int i = 0; i < count; ++i) {
    const int slot = slots[i];
    p->ptr[slot] = t[i]->data;
    for (int k = 0; k < 4; ++k) p->stride[slot][k] = eff_stride(t[i], k);
    if (vector_ok(t[i], p->vec)) p->vec_mask |= 1u << slot;
  }
  return VK_STATUS_SUCCESS;
}

/* ---------------------------------------------------------------------------------------- */
/* per thread (host and device)                                                               */
/* ---------------------------------------------------------------------------------------- */

struct Thread {
  int64_t b, h, r, c;     /* batch, head, token row / column in the (padded) map */
  int32_t w_local, slot, lane;
  bool active;            /* the thread serves a window of this launch */
  bool real;              /* ... and its token lies inside the map (not zero padding) */
};

/* Block `block`, thread `tid` -> its window, token slot and lane. S > 0: compile-time s. */
template <int S>
VK_HDI Thread thread_coords(const Params& p, int64_t block, int tid) {
  const int s = S > 0 ? S : p.s;
  Thread th;
  const uint32_t w_local = fastdiv((uint32_t)tid, p.div_win_threads);
  const uint32_t rem = (uint32_t)tid - w_local * (uint32_t)p.win_threads;
  th.w_local = (int32_t)w_local;
  th.slot = (int32_t)(rem >> p.log2_lanes);
  th.lane = (int32_t)(rem & (uint32_t)(p.lanes - 1));
  const int64_t win64 = block * p.wpb + w_local;
  th.active = (int32_t)w_local < p.wpb && win64 < p.n_windows;
  const uint32_t win = th.active ? (uint32_t)win64 : 0u;
  const uint32_t bh = fastdiv(win, p.div_map);
  const uint32_t wi = win - bh * (uint32_t)(p.gh * p.gw);
  const uint32_t y = fastdiv(wi, p.div_gw);
  const uint32_t b = fastdiv(bh, p.div_heads);
  const int64_t wy = y, wx = wi - y * (uint32_t)p.gw;
  th.b = b;
  th.h = bh - b * (uint32_t)p.heads;
  th.r = wy * s + th.slot / s;
  th.c = wx * s + th.slot % s;
  th.real = th.active && th.r < p.H && th.c < p.W;
  return th;
}

/* Element offset of (b, h, token, channel) in tensor `slot`. */
VK_HDI int64_t offset(const Params& p, int slot, const Thread& th, int64_t channel) {
  return th.b * p.stride[slot][0] + th.h * p.stride[slot][1] +
         (th.r * p.W + th.c) * p.stride[slot][2] + channel * p.stride[slot][3];
}

/* Channel of the first element of vector t of a lane. */
VK_HDI int64_t lane_channel(const Params& p, int lane, int t) {
  return (int64_t)(lane + p.lanes * t) * p.vec;
}

VK_HDI bool vec_ok(const Params& p, int slot) { return (p.vec_mask >> slot) & 1u; }

/* Shared-memory layout of one window (p.smem_per_window bytes from w_local · smem_per_window):
 * `ntensors` arrays [nk][d] of T (16-byte vectors), then (backward) the fp32 probability and
 * score-gradient rows [nk][nk] each (4-byte accesses). The CPU build checks that the arrays and
 * the rows start 16-byte aligned. */
template <class T>
VK_HDI T* smem_tensor(unsigned char* smem, const Params& p, int w_local, int which) {
  T* a = reinterpret_cast<T*>(smem + (int64_t)w_local * p.smem_per_window) +
       (int64_t)which * p.nk * p.d;
  VK_ASSERT_SMEM_ALIGNED(smem, a, 16, "Hi-Fi window array");
  return a;
}

VK_HDI float* smem_rows(unsigned char* smem, const Params& p, int w_local, int which /*0: p, 1: ds*/) {
  unsigned char* rows = smem + (int64_t)w_local * p.smem_per_window +
                        4 * (int64_t)p.nk * p.d * vk_dtype_size(p.dtype);
  VK_ASSERT_SMEM_ALIGNED(smem, rows, 16, "Hi-Fi window p / ds rows");
  return reinterpret_cast<float*>(rows) + (int64_t)which * p.nk * p.nk;  /* fp32, read singly */
}

/* Phase 1: copy this thread's channel vectors of its token from the tensors `slots[0..n)` into
 * the window's shared arrays 0..n-1 (zeros for pad tokens and idle threads). */
template <class T>
VK_HDI void stage(const Params& p, const Thread& th, unsigned char* smem, const int* slots, int n) {
  if (th.w_local >= p.wpb) return;  /* threads past the last window of the block own no smem */
  for (int a = 0; a < n; ++a) {
    T* dst = smem_tensor<T>(smem, p, th.w_local, a) + (int64_t)th.slot * p.d;
    const int slot = slots[a];
    const T* src = static_cast<const T*>(p.ptr[slot]);
    for (int t = 0; t < p.nv; ++t) {
      const int64_t ch = lane_channel(p, th.lane, t);
      if (th.real) {
        gather_chunk(dst + ch, src + offset(p, slot, th, ch), p.stride[slot][3], vec_ok(p, slot));
      } else {
        zero_chunk(dst + ch);
      }
    }
  }
}

/* Forward phase 2a: this lane's partial dot products q_i·k_j (j < nk) over its channels. */
template <class T, int NK>
VK_HDI void fwd_partial_scores(const Params& p, const Thread& th, unsigned char* smem, float* sc) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int V = Vec<T>::kElems;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) sc[j] = 0.0f;
  if (th.w_local >= p.wpb) return;
  const T* ks = smem_tensor<T>(smem, p, th.w_local, 0);
  const T* q = static_cast<const T*>(p.ptr[kQ]);
  for (int t = 0; t < p.nv; ++t) {
    const int64_t ch = lane_channel(p, th.lane, t);
    float qv[V];
    if (th.real) {
      load_chunk_float(q + offset(p, kQ, th, ch), p.stride[kQ][3], vec_ok(p, kQ), qv);
    } else {
VK_UNROLL
      for (int e = 0; e < V; ++e) qv[e] = 0.0f;
    }
VK_UNROLL
    for (int j = 0; j < NKMAX; ++j) {
      if (j < nk) {
        float kv[V];
        load16_float(ks + (int64_t)j * p.d + ch, kv);
        float acc = 0.0f;
VK_UNROLL
        for (int e = 0; e < V; ++e) acc = fmaf(qv[e], kv[e], acc);
        sc[j] += acc;
      }
    }
  }
}

/* In place: full dot products -> softmax probabilities (fp32, max-subtracted, base 2). */
template <int NK>
VK_HDI void softmax_row(const Params& p, float* sc) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
  float m = -INFINITY;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    if (j < nk) {
      sc[j] *= p.scale_log2;
      m = fmaxf(m, sc[j]);
    }
  }
  float l = 0.0f;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    if (j < nk) {
      sc[j] = exp2f(sc[j] - m);
      l += sc[j];
    }
  }
  const float inv = rcp_normal(l);  /* l in [1, nk] */
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) sc[j] *= inv;
}

/* Σ_j w_j · row_j of a shared [nk][d] array, for this lane's vector at channel ch. */
template <class T, int NK>
VK_HDI void weighted_rows(const Params& p, const T* rows, const float* w, int64_t ch,
                          float* acc) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int V = Vec<T>::kElems;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
VK_UNROLL
  for (int e = 0; e < V; ++e) acc[e] = 0.0f;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    if (j < nk) {
      float x[V];
      load16_float(rows + (int64_t)j * p.d + ch, x);
VK_UNROLL
      for (int e = 0; e < V; ++e) acc[e] = fmaf(w[j], x[e], acc[e]);
    }
  }
}

/* Forward phase 2b: given the lane-summed scores, softmax and write o_i = Σ_j p_ij v_j. */
template <class T, int NK>
VK_HDI void fwd_finish(const Params& p, const Thread& th, unsigned char* smem, float* sc) {
  constexpr int V = Vec<T>::kElems;
  softmax_row<NK>(p, sc);
  if (!th.real) return;
  const T* vs = smem_tensor<T>(smem, p, th.w_local, 1);
  T* o = static_cast<T*>(p.ptr[kO]);
  for (int t = 0; t < p.nv; ++t) {
    const int64_t ch = lane_channel(p, th.lane, t);
    float acc[V];
    weighted_rows<T, NK>(p, vs, sc, ch, acc);
    store_chunk_float(o + offset(p, kO, th, ch), p.stride[kO][3], vec_ok(p, kO), acc);
  }
}

/* Backward shared arrays: 0 = q, 1 = k, 2 = v, 3 = dO. */
/* Backward phase 2a: partial q_i·k_j and dO_i·v_j over this lane's channels. */
template <class T, int NK>
VK_HDI void bwd_partial(const Params& p, const Thread& th, unsigned char* smem, float* sc,
                        float* dp) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int V = Vec<T>::kElems;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    sc[j] = 0.0f;
    dp[j] = 0.0f;
  }
  if (th.w_local >= p.wpb) return;
  const T* qs = smem_tensor<T>(smem, p, th.w_local, 0);
  const T* ks = smem_tensor<T>(smem, p, th.w_local, 1);
  const T* vs = smem_tensor<T>(smem, p, th.w_local, 2);
  const T* dos = smem_tensor<T>(smem, p, th.w_local, 3);
  for (int t = 0; t < p.nv; ++t) {
    const int64_t ch = lane_channel(p, th.lane, t);
    float qv[V], dov[V];
    load16_float(qs + (int64_t)th.slot * p.d + ch, qv);
    load16_float(dos + (int64_t)th.slot * p.d + ch, dov);
VK_UNROLL
    for (int j = 0; j < NKMAX; ++j) {
      if (j < nk) {
        float kv[V], vv[V];
        load16_float(ks + (int64_t)j * p.d + ch, kv);
        load16_float(vs + (int64_t)j * p.d + ch, vv);
        float a = 0.0f, b = 0.0f;
VK_UNROLL
        for (int e = 0; e < V; ++e) {
          a = fmaf(qv[e], kv[e], a);
          b = fmaf(dov[e], vv[e], b);
        }
        sc[j] += a;
        dp[j] += b;
      }
    }
  }
}

/* Backward phase 2b: p, ds from the lane-summed rows; dq written; p and ds rows to smem. */
template <class T, int NK>
VK_HDI void bwd_rows(const Params& p, const Thread& th, unsigned char* smem, float* sc, float* dp) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int V = Vec<T>::kElems;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
  softmax_row<NK>(p, sc);
  float delta = 0.0f;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    if (j < nk) delta = fmaf(sc[j], dp[j], delta);
  }
  /* ds := p (dp - Δ); rows of pad queries (no output, no gradient) are zero */
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    dp[j] = th.real ? sc[j] * (dp[j] - delta) : 0.0f;
    if (!th.real) sc[j] = 0.0f;
  }
  if (th.w_local >= p.wpb) return;
  float* prow = smem_rows(smem, p, th.w_local, 0) + (int64_t)th.slot * nk;
  float* dsrow = smem_rows(smem, p, th.w_local, 1) + (int64_t)th.slot * nk;
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    if (j < nk && (j & (p.lanes - 1)) == th.lane) {  /* each lane writes its share of the row */
      prow[j] = sc[j];
      dsrow[j] = dp[j];
    }
  }
  if (!th.real) return;
  const T* ks = smem_tensor<T>(smem, p, th.w_local, 1);
  T* dq = static_cast<T*>(p.ptr[kDQ]);
  for (int t = 0; t < p.nv; ++t) {
    const int64_t ch = lane_channel(p, th.lane, t);
    float acc[V];
    weighted_rows<T, NK>(p, ks, dp, ch, acc);
VK_UNROLL
    for (int e = 0; e < V; ++e) acc[e] *= p.scale;
    store_chunk_float(dq + offset(p, kDQ, th, ch), p.stride[kDQ][3], vec_ok(p, kDQ), acc);
  }
}

/* Backward phase 3: this thread's token as a key: dk_j = scale Σ_i ds_ij q_i, dv_j = Σ_i p_ij dO_i. */
template <class T, int NK>
VK_HDI void bwd_columns(const Params& p, const Thread& th, unsigned char* smem) {
  const int nk = NK > 0 ? NK : p.nk;
  constexpr int V = Vec<T>::kElems;
  constexpr int NKMAX = NK > 0 ? NK : kMaxNK;
  if (!th.real) return;
  const float* prow = smem_rows(smem, p, th.w_local, 0);
  const float* dsrow = smem_rows(smem, p, th.w_local, 1);
  float pcol[NKMAX], dscol[NKMAX];
VK_UNROLL
  for (int i = 0; i < NKMAX; ++i) {
    pcol[i] = i < nk ? prow[(int64_t)i * nk + th.slot] : 0.0f;
    dscol[i] = i < nk ? dsrow[(int64_t)i * nk + th.slot] : 0.0f;
  }
  const T* qs = smem_tensor<T>(smem, p, th.w_local, 0);
  const T* dos = smem_tensor<T>(smem, p, th.w_local, 3);
  T* dk = static_cast<T*>(p.ptr[kDK]);
  T* dv = static_cast<T*>(p.ptr[kDV]);
  for (int t = 0; t < p.nv; ++t) {
    const int64_t ch = lane_channel(p, th.lane, t);
    float acc[V];
    weighted_rows<T, NK>(p, qs, dscol, ch, acc);
VK_UNROLL
    for (int e = 0; e < V; ++e) acc[e] *= p.scale;
    store_chunk_float(dk + offset(p, kDK, th, ch), p.stride[kDK][3], vec_ok(p, kDK), acc);
    weighted_rows<T, NK>(p, dos, pcol, ch, acc);
    store_chunk_float(dv + offset(p, kDV, th, ch), p.stride[kDV][3], vec_ok(p, kDV), acc);
  }
}

}  // namespace hifi
}  // namespace vk

#endif /* VITKERN_HILO_HIFI_CORE_H_ */
