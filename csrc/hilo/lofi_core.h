/* HiLo Lo-Fi attention forward (every query attends to the s×s average-pooled keys / values),
 * the per-thread program of csrc/hilo/lofi.cu as __host__ __device__ phases, shared with the CPU
 * test build (tests/csrc/hilo_host.cpp) exactly like hifi_core.h.
 *
 * Lo-Fi has few keys at ViT sizes (M = 49 for LITv2 stage 3 at 224², s = 2) and a small head dim
 * (32): the kernel runs on CUDA cores with fp32 math throughout, and pools in the kernel.
 *
 * Block: one (batch, head) and a tile of queries; L lanes per query, lane l owning the 16
 * contiguous channels [16 l, 16 l + 16). d is any multiple of 16 up to 128; L is the power of two
 * >= d / 16 (d = 16, 32, 48, 64, 80, 96, 112, 128 -> L = 1, 2, 4, 4, 8, 8, 8, 8), so the lanes of
 * a query are an aligned xor-butterfly group of a warp. The rows are padded to dp = 16 L channels:
 * lanes l >= d / 16 are idle (zero q, zero padded keys and values -> partial score exactly 0 and
 * zero accumulators), and write nothing. The keys are walked in chunks of KC = 32 pooled keys:
 *   stage:   the block pools the chunk's keys and values into shared memory (fp32, rows of dp
 *            channels, channels >= d written as 0): each pooled vector is the mean of its s×s
 *            source tokens read in 16-byte vectors, divisor s² also at the zero-padded border
 *            (LITv2's detection semantics), or read as given when the caller passes pooled k, v
 *            (pool = 1); no global read past channel d        | barrier |
 *   scores:  lane partial dot products q·k_j over its 16 channels, summed over the L lanes
 *            (shuffles on the GPU), then an online-softmax step (fp32, base 2) and acc += p v_j
 *                                                           | barrier |
 * and finally o = acc / l written once. The pooled tensor is never materialised in memory.
 * Queries are the N real tokens (padding only affects the pooled keys). Forward only: the
 * backward is the Triton kernel's (the op refuses "cuda" when gradients are needed).
 */
#ifndef VITKERN_HILO_LOFI_CORE_H_
#define VITKERN_HILO_LOFI_CORE_H_

#include <math.h>
#include <stdio.h>

#include "common.h"
#include "common/args.h"
#include "common/numeric.h"

namespace vk {
namespace lofi {

enum TensorSlot { kQ = 0, kK, kV, kO, kNumSlots };

constexpr int kChannelsPerLane = 16;
constexpr int kMaxLanes = 8;        /* d <= 128 */
constexpr int kMaxHeadDim = kChannelsPerLane * kMaxLanes;
constexpr int kKeyChunk = 32;       /* pooled keys staged per step */
constexpr int kMaxPool = 8;
constexpr int kBlockThreads = 256;

struct Params {
  void* ptr[kNumSlots];
  int64_t stride[kNumSlots][4];
  int64_t B, heads, N;          /* queries */
  int64_t MH, MW;               /* the map keys are read from (full map, or the pooled map) */
  int64_t gw, M;                /* pooled map width, number of (pooled) keys */
  int32_t pool, d, dp, vec, lanes, log2_lanes, log2_nvec, qt, block_threads;
  int64_t n_qtiles, grid, smem_bytes;
  FastDiv div_qtiles, div_heads, div_gw;
  uint32_t vec_mask;
  int32_t dtype;
  float scale_log2, inv_pool2;
};

inline vitkern_status supported(int32_t dtype, int64_t d, int64_t pool, char* why, size_t n) {
  char buf[256];
  if (vk_dtype_size(dtype) == 0) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_DTYPE, "dtype not float32/float16/bfloat16");
  }
  if (d < kChannelsPerLane || d > kMaxHeadDim || d % kChannelsPerLane != 0) {
    snprintf(buf, sizeof buf, "head_dim %lld not supported by the CUDA Lo-Fi kernel (a multiple "
             "of %d up to %d: %d channels per lane)", (long long)d, kChannelsPerLane, kMaxHeadDim,
             kChannelsPerLane);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  if (pool < 1 || pool > kMaxPool) {
    snprintf(buf, sizeof buf, "window_size %lld > %d for in-kernel pooling in the CUDA Lo-Fi kernel; "
             "pool k, v first and pass kv_pooled=True", (long long)pool, kMaxPool);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  return VK_STATUS_SUCCESS;
}

/* q, o: (B, heads, H·W, d); k, v: (B, heads, H·W, d) pooled here with factor s, or
 * (B, heads, ceil(H/s)·ceil(W/s), d) already pooled (kv_pooled). */
inline vitkern_status make_params(Params* p, const vitkern_tensor* q, const vitkern_tensor* k,
                                  const vitkern_tensor* v, const vitkern_tensor* o, int64_t H,
                                  int64_t W, int64_t s, int kv_pooled, float scale, char* why,
                                  size_t n) {
  char buf[256];
  memset(p, 0, sizeof(*p));
  const vitkern_tensor* t[4] = {q, k, v, o};
  VK_CHECK(check_descriptors(t, 4, why, n));
  const int64_t B = q->sizes[0], heads = q->sizes[1], N = q->sizes[2], d = q->sizes[3];
  if (H < 1 || W < 1 || H * W != N || s < 1) {
    snprintf(buf, sizeof buf, "hw=(%lld, %lld) / window_size %lld do not match N=%lld",
             (long long)H, (long long)W, (long long)s, (long long)N);
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, buf);
  }
  const int64_t gh = vk_cdiv(H, s), gw = vk_cdiv(W, s);
  const int64_t n_kv = kv_pooled ? gh * gw : N;
  for (int i = 0; i < 4; ++i) {
    const int64_t want[4] = {B, heads, (i == 1 || i == 2) ? n_kv : N, d};
    for (int j = 0; j < 4; ++j) {
      if (t[i]->sizes[j] != want[j]) {
        return fail(why, n, VK_STATUS_INVALID_ARGUMENT,
                    "shapes: q, o (B, heads, H*W, d); k, v the same, or the pooled map if kv_pooled");
      }
    }
  }
  const int64_t pool = kv_pooled ? 1 : s;
  const vitkern_status st = supported(q->dtype, d, pool, why, n);
  if (st != VK_STATUS_SUCCESS) return st;
  if (!(scale == scale) || scale == INFINITY || scale == -INFINITY) {
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "scale must be finite");
  }
  p->dtype = q->dtype;
  p->B = B;
  p->heads = heads;
  p->N = N;
  p->pool = (int32_t)pool;
  p->MH = kv_pooled ? gh : H;
  p->MW = kv_pooled ? gw : W;
  p->gw = gw;
  p->M = gh * gw;
  p->d = (int32_t)d;
  p->vec = (int32_t)(16 / vk_dtype_size(q->dtype));
  p->log2_lanes = 0;  /* lanes: the power of two >= d / 16 (an xor-shuffle group) */
  while ((1 << p->log2_lanes) * kChannelsPerLane < d) ++p->log2_lanes;
  p->lanes = 1 << p->log2_lanes;
  p->dp = p->lanes * kChannelsPerLane;  /* padded row width in shared memory */
  p->log2_nvec = 0;                     /* dp / vec 16-byte vectors per padded row */
  while ((1 << p->log2_nvec) * p->vec < p->dp) ++p->log2_nvec;
  p->block_threads = kBlockThreads;
  p->qt = kBlockThreads / p->lanes;
  p->n_qtiles = vk_cdiv(N, p->qt);
  p->grid = B * heads * p->n_qtiles;
  p->smem_bytes = 2 * (int64_t)kKeyChunk * p->dp * 4;
  if (p->grid >= 0x7fffffffLL || B * heads >= 0x7fffffffLL || p->M >= 0x7fffffffLL) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, "more than 2^31 query tiles in one launch: split the batch");
  }
  p->div_qtiles = make_fastdiv((uint32_t)(p->n_qtiles > 0 ? p->n_qtiles : 1));
  p->div_heads = make_fastdiv((uint32_t)(heads > 0 ? heads : 1));
  p->div_gw = make_fastdiv((uint32_t)gw);
  p->scale_log2 = scale * 1.4426950408889634f;
  p->inv_pool2 = 1.0f / (float)(pool * pool);
  for (int i = 0; i < 4; ++i) {
    p->ptr[i] = t[i]->data;
    for (int j = 0; j < 4; ++j) p->stride[i][j] = eff_stride(t[i], j);
    if (vector_ok(t[i], p->vec)) p->vec_mask |= 1u << i;
  }
  return VK_STATUS_SUCCESS;
}

struct Thread {
  int64_t b, h, query;
  int32_t lane;
  bool active;  /* a real query of this launch */
};

VK_HDI Thread thread_coords(const Params& p, int64_t block, int tid) {
  Thread th;
  const uint32_t bh = fastdiv((uint32_t)block, p.div_qtiles);
  const uint32_t tile = (uint32_t)block - bh * (uint32_t)p.n_qtiles;
  const uint32_t b = fastdiv(bh, p.div_heads);
  th.b = b;
  th.h = bh - b * (uint32_t)p.heads;
  th.lane = tid & (p.lanes - 1);
  th.query = (int64_t)tile * p.qt + (tid >> p.log2_lanes);
  th.active = (tid >> p.log2_lanes) < p.qt && th.query < p.N;
  return th;
}

VK_HDI int64_t base_offset(const Params& p, int slot, int64_t b, int64_t h) {
  return b * p.stride[slot][0] + h * p.stride[slot][1];
}

VK_HDI bool vec_ok(const Params& p, int slot) { return (p.vec_mask >> slot) & 1u; }

/* Whether lane `lane` owns real channels (else it is a padding lane of d < dp: idle). */
VK_HDI bool lane_has_channels(const Params& p, int lane) { return lane * kChannelsPerLane < p.d; }

/* Shared memory of a block: the chunk's pooled keys [kKeyChunk][dp], then its values
 * [kKeyChunk][dp], fp32, read and written as single floats. The CPU build checks that both
 * regions start 16-byte aligned (dp is a multiple of 16 channels: every row does too). */
template <class F /* float or const float */>
VK_HDI F* smem_values(F* smem, const Params& p) {
  F* values = smem + (int64_t)kKeyChunk * p.dp;
  VK_ASSERT_SMEM_ALIGNED(smem, values, 16, "Lo-Fi value rows");
  return values;
}

/* Per-thread running state across key chunks. */
struct State {
  float q[kChannelsPerLane];
  float acc[kChannelsPerLane];
  float m, l;
};

template <class T>
VK_HDI void init_state(const Params& p, const Thread& th, State& st) {
  constexpr int V = Vec<T>::kElems;
  st.m = -INFINITY;
  st.l = 0.0f;
  VK_UNROLL
  for (int c = 0; c < kChannelsPerLane; ++c) {
    st.acc[c] = 0.0f;
    st.q[c] = 0.0f;
  }
  if (!th.active || !lane_has_channels(p, th.lane)) return;  /* padding lanes: q = 0 */
  const T* q = static_cast<const T*>(p.ptr[kQ]) + base_offset(p, kQ, th.b, th.h) +
               th.query * p.stride[kQ][2];
  VK_UNROLL
  for (int c = 0; c < kChannelsPerLane; c += V) {
    const int64_t ch = (int64_t)th.lane * kChannelsPerLane + c;
    load_chunk_float(q + ch * p.stride[kQ][3], p.stride[kQ][3], vec_ok(p, kQ), st.q + c);
  }
}

/* Stage pooled keys [j0, j0 + kKeyChunk) of (b, h) as fp32 [kKeyChunk][dp] K then V; work item
 * `item` = (key, 16-byte vector of the padded row) is done by thread item % block_threads. The
 * vectors of channels >= d (d and dp are multiples of the vector width: a vector is all real or
 * all padding) read nothing and store zeros, like keys >= M. */
template <class T>
VK_HDI void stage_item(const Params& p, int64_t b, int64_t h, int64_t j0, int item,
                       float* smem) {
  constexpr int V = Vec<T>::kElems;
  const int j = item >> p.log2_nvec;
  const int64_t ch = (int64_t)(item & ((1 << p.log2_nvec) - 1)) * V;
  const int64_t pj = j0 + j;
  float ks[V], vs[V];
  VK_UNROLL
  for (int e = 0; e < V; ++e) {
    ks[e] = 0.0f;
    vs[e] = 0.0f;
  }
  if (pj < p.M && ch < p.d) {
    const uint32_t py = fastdiv((uint32_t)pj, p.div_gw);
    const int64_t px = pj - (int64_t)py * p.gw;
    const T* kb = static_cast<const T*>(p.ptr[kK]) + base_offset(p, kK, b, h) + ch * p.stride[kK][3];
    const T* vb = static_cast<const T*>(p.ptr[kV]) + base_offset(p, kV, b, h) + ch * p.stride[kV][3];
    for (int dy = 0; dy < p.pool; ++dy) {
      const int64_t r = (int64_t)py * p.pool + dy;
      if (r >= p.MH) break;
      for (int dx = 0; dx < p.pool; ++dx) {
        const int64_t c = px * p.pool + dx;
        if (c >= p.MW) break;  /* zero padding: contributes nothing, divisor stays s² */
        const int64_t tok = r * p.MW + c;
        float x[V];
        load_chunk_float(kb + tok * p.stride[kK][2], p.stride[kK][3], vec_ok(p, kK), x);
        VK_UNROLL
        for (int e = 0; e < V; ++e) ks[e] += x[e];
        load_chunk_float(vb + tok * p.stride[kV][2], p.stride[kV][3], vec_ok(p, kV), x);
        VK_UNROLL
        for (int e = 0; e < V; ++e) vs[e] += x[e];
      }
    }
  }
  float* kd = smem + (int64_t)j * p.dp + ch;
  float* vd = smem_values(smem, p) + (int64_t)j * p.dp + ch;
  VK_UNROLL
  for (int e = 0; e < V; ++e) {
    kd[e] = ks[e] * p.inv_pool2;
    vd[e] = vs[e] * p.inv_pool2;
  }
}

VK_HDI int stage_items(const Params& p) { return kKeyChunk << p.log2_nvec; }

/* This lane's partial q·k_j over its 16 channels, j < kKeyChunk (0 for a padding lane). */
VK_HDI void partial_scores(const Params& p, const Thread& th, const State& st, const float* smem,
                           float* sc) {
  const float* kbase = smem + (int64_t)th.lane * kChannelsPerLane;
  VK_UNROLL
  for (int j = 0; j < kKeyChunk; ++j) {
    const float* kr = kbase + (int64_t)j * p.dp;
    float a = 0.0f;
    VK_UNROLL
    for (int c = 0; c < kChannelsPerLane; ++c) a = fmaf(st.q[c], kr[c], a);
    sc[j] = a;
  }
}

/* Online-softmax step with the lane-summed scores of keys [j0, j0 + kKeyChunk). */
VK_HDI void update(const Params& p, const Thread& th, State& st, const float* smem, int64_t j0,
                   float* sc) {
  float m_new = st.m;
  VK_UNROLL
  for (int j = 0; j < kKeyChunk; ++j) {
    sc[j] = (j0 + j < p.M) ? sc[j] * p.scale_log2 : -INFINITY;
    m_new = fmaxf(m_new, sc[j]);
  }
  const float alpha = exp2f(st.m - m_new);  /* st.m = -inf on the first chunk: alpha = 0 */
  st.l *= alpha;
  VK_UNROLL
  for (int c = 0; c < kChannelsPerLane; ++c) st.acc[c] *= alpha;
  const float* vbase = smem_values(smem, p) + (int64_t)th.lane * kChannelsPerLane;
  VK_UNROLL
  for (int j = 0; j < kKeyChunk; ++j) {
    const float pj = exp2f(sc[j] - m_new);
    st.l += pj;
    const float* vr = vbase + (int64_t)j * p.dp;
    VK_UNROLL
    for (int c = 0; c < kChannelsPerLane; ++c) st.acc[c] = fmaf(pj, vr[c], st.acc[c]);
  }
  st.m = m_new;
}

template <class T>
VK_HDI void finish(const Params& p, const Thread& th, const State& st) {
  constexpr int V = Vec<T>::kElems;
  if (!th.active || !lane_has_channels(p, th.lane)) return;  /* channels < d only */
  const float inv = rcp_normal(st.l);  /* l >= 1: the running max contributes exp2(0) */
  T* o = static_cast<T*>(p.ptr[kO]) + base_offset(p, kO, th.b, th.h) + th.query * p.stride[kO][2];
  VK_UNROLL
  for (int c = 0; c < kChannelsPerLane; c += V) {
    float x[V];
    VK_UNROLL
    for (int e = 0; e < V; ++e) x[e] = st.acc[c + e] * inv;
    const int64_t ch = (int64_t)th.lane * kChannelsPerLane + c;
    store_chunk_float(o + ch * p.stride[kO][3], p.stride[kO][3], vec_ok(p, kO), x);
  }
}

}  // namespace lofi
}  // namespace vk

#endif /* VITKERN_HILO_LOFI_CORE_H_ */
