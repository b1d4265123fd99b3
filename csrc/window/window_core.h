/* Swin window attention forward (inference) for ws = 7 and 12, d = 32, fp16 / bf16 on tensor
 * cores: the per-thread program of csrc/window/window.cu as __host__ __device__ phases, shared
 * with the CPU test build (tests/csrc/window_host.cpp), which replaces only the two warp-level
 * tensor-core products (S = Q Kᵀ, O = P V: wmma on the GPU, a loop over the same shared-memory
 * tiles on the CPU) and the one shuffle between the two lanes of a row.
 *
 * Block: 4 warps on one window at a time (grid-stride over windows). A window's n = ws² tokens
 * (49 or 144) are staged in shared memory as NP = round16(n) rows (64 or 144) of q, k, v (raw
 * dtype, rows beyond n and pad tokens zero); warp w walks the 16-row query tiles w, w + 4, ...:
 *   S = Q_tile Kᵀ (wmma 16×16×16, fp32) -> shared;  each row's logits scale·S + bias + mask in
 *   fp32, softmax (2 lanes per row), P (dtype) -> shared;  O = P V (wmma) -> shared;  real
 *   query rows written to o, 16-byte vectors.
 * Semantics (vitkern.reference.window): effective window / shift clamp done by the caller;
 * cyclic shift with Swin's 3×3 region mask (mask_value added to mixed pairs); zero padding of
 * non-divisible maps in either order ("shift_then_pad" / "pad_then_shift"), pad tokens are
 * unmasked zero keys / values (bias and mask still apply), pad queries are dropped; relative
 * position bias from Swin's ((2ws-1)², heads) table or a dense (heads, ws², ws²) bias (fp32).
 */
#ifndef VITKERN_WINDOW_WINDOW_CORE_H_
#define VITKERN_WINDOW_WINDOW_CORE_H_

#include <math.h>
#include <stdio.h>

#include "common.h"
#include "common/args.h"
#include "common/numeric.h"

namespace vk {
namespace win {

constexpr int kHeadDim = 32;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kLdQKV = kHeadDim + 8;  /* 80-byte rows: wmma ldm multiple of 8, fewer conflicts */

enum BiasKind { kNoBias = 0, kTableBias = 1, kDenseBias = 2 };
enum PadOrder { kShiftThenPad = 0, kPadThenShift = 1 };

/* Tile geometry of a window size (compile-time). */
template <int WS>
struct Geo {
  static constexpr int kN = WS * WS;
  static constexpr int kNP = (kN + 15) / 16 * 16;  /* 64 for ws = 7, 144 for ws = 12 */
  static constexpr int kTiles = kNP / 16;
  static constexpr int kLdS = kNP + 4;           /* fp32 scores row (multiple of 4) */
  static constexpr int kLdP = kNP + 8;           /* dtype probabilities row (multiple of 8) */
  static constexpr int64_t kQKVBytes = 3 * (int64_t)kNP * kLdQKV * 2;
  static constexpr int64_t kWarpBytes = 16 * (int64_t)kLdS * 4 + 16 * (int64_t)kLdP * 2;
  static constexpr int64_t kSmemBytes = kQKVBytes + kWarps * kWarpBytes;
};

struct Params {
  void* q; void* k; void* v; void* o;
  int64_t stride[4][4];         /* q, k, v, o: (B, heads, N, d) strides in elements */
  const float* bias;
  int64_t bias_stride[3];       /* table: (entry, head, -); dense: (head, i, j) */
  int64_t B, heads, H, W, Hp, Wp, gh, gw, n_windows;
  int32_t ws, shift, pad_order, bias_kind, dtype;
  uint32_t vec_mask;            /* bit t: tensor t (q, k, v, o) allows 16-byte vectors */
  float scale_log2, mask_log2;  /* scale and mask_value times log2(e) */
  int64_t smem_bytes;
  int32_t grid;
};

/* Whether the kernel takes (dtype, head_dim, effective window). */
inline vitkern_status supported(int32_t dtype, int64_t d, int64_t ws, char* why, size_t n) {
  char buf[256];
  if (dtype != VK_DTYPE_FP16 && dtype != VK_DTYPE_BF16) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_DTYPE,
                "the CUDA window kernel runs on tensor cores: float16 / bfloat16 only");
  }
  if (d != kHeadDim) {
    snprintf(buf, sizeof buf, "head_dim %lld not supported by the CUDA window kernel (32: "
             "Swin's head dim)", (long long)d);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  if (ws != 7 && ws != 12) {
    snprintf(buf, sizeof buf, "window %lld not supported by the CUDA window kernel (7, 12)",
             (long long)ws);
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, buf);
  }
  return VK_STATUS_SUCCESS;
}

/* q, k, v, o: (B, heads, H·W, 32); ws / shift already the effective (clamped) ones; bias: NULL,
 * a fp32 table ((2ws-1)², heads) or dense (heads, ws², ws²). max_blocks bounds the grid. */
inline vitkern_status make_params(Params* p, const vitkern_tensor* q, const vitkern_tensor* k,
                                  const vitkern_tensor* v, const vitkern_tensor* o,
                                  const vitkern_tensor* bias, int64_t H, int64_t W, int64_t ws,
                                  int64_t shift, int32_t pad_order, float mask_value, float scale,
                                  int64_t max_blocks, char* why, size_t n) {
  memset(p, 0, sizeof(*p));
  const vitkern_tensor* t[4] = {q, k, v, o};
  VK_CHECK(check_descriptors(t, 4, why, n));
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      if (t[i]->sizes[j] != q->sizes[j]) {
        return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "q, k, v, o must share one shape");
      }
    }
  }
  const int64_t B = q->sizes[0], heads = q->sizes[1], N = q->sizes[2], d = q->sizes[3];
  if (H < 1 || W < 1 || H * W != N) return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "hw does not match N");
  if (H + ws >= 0x7fffffffLL || W + ws >= 0x7fffffffLL) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, "H or W >= 2^31");
  }
  const vitkern_status st = supported(q->dtype, d, ws, why, n);
  if (st != VK_STATUS_SUCCESS) return st;
  if (shift < 0 || shift >= ws) return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "shift must be in [0, ws)");
  if (pad_order != kShiftThenPad && pad_order != kPadThenShift) {
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "pad_order must be 0 (shift_then_pad) or 1 (pad_then_shift)");
  }
  /* mask_value = -inf (a hard mask) is fine: every row keeps its own token unmasked */
  if (!(scale == scale) || scale == INFINITY || scale == -INFINITY || !(mask_value <= 0.0f)) {
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "scale must be finite and mask_value <= 0");
  }
  p->bias_kind = kNoBias;
  if (bias != NULL) {
    if (bias->dtype != VK_DTYPE_FP32 || (bias->data == NULL)) {
      return fail(why, n, VK_STATUS_UNSUPPORTED_DTYPE, "rel_pos_bias must be a float32 tensor");
    }
    const int64_t nt = (2 * ws - 1) * (2 * ws - 1), nn = ws * ws;
    /* descriptors are left-padded to 4-D: a table is (1, 1, nt, heads), dense (1, heads, n, n) */
    if (bias->sizes[0] == 1 && bias->sizes[1] == 1 && bias->sizes[2] == nt && bias->sizes[3] == heads) {
      p->bias_kind = kTableBias;
      p->bias_stride[0] = eff_stride(bias, 2);
      p->bias_stride[1] = eff_stride(bias, 3);
    } else if (bias->sizes[0] == 1 && bias->sizes[1] == heads && bias->sizes[2] == nn && bias->sizes[3] == nn) {
      p->bias_kind = kDenseBias;
      p->bias_stride[0] = eff_stride(bias, 1);
      p->bias_stride[1] = eff_stride(bias, 2);
      p->bias_stride[2] = eff_stride(bias, 3);
    } else {
      return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "rel_pos_bias must be ((2ws-1)^2, heads) or (heads, ws^2, ws^2)");
    }
    p->bias = static_cast<const float*>(bias->data);
  }
  p->q = q->data;
  p->k = k->data;
  p->v = v->data;
  p->o = o->data;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) p->stride[i][j] = eff_stride(t[i], j);
    if (vector_ok(t[i], 8)) p->vec_mask |= 1u << i;  /* 8 16-bit elements: 16 bytes */
  }
  p->B = B;
  p->heads = heads;
  p->H = H;
  p->W = W;
  p->ws = (int32_t)ws;
  p->shift = (int32_t)shift;
  p->pad_order = pad_order;
  p->gh = vk_cdiv(H, ws);
  p->gw = vk_cdiv(W, ws);
  p->Hp = p->gh * ws;
  p->Wp = p->gw * ws;
  p->n_windows = B * heads * p->gh * p->gw;
  if (p->n_windows >= 0x7fffffffLL) {
    return fail(why, n, VK_STATUS_UNSUPPORTED_SHAPE, "more than 2^31 windows: split the batch");
  }
  p->dtype = q->dtype;
  p->scale_log2 = scale * 1.4426950408889634f;
  p->mask_log2 = mask_value * 1.4426950408889634f;
  p->smem_bytes = ws == 7 ? Geo<7>::kSmemBytes : Geo<12>::kSmemBytes;
  int64_t grid = p->n_windows < max_blocks ? p->n_windows : max_blocks;
  p->grid = (int32_t)(grid > 0 ? grid : 0);
  return VK_STATUS_SUCCESS;
}

/* A window of the launch: batch, head and its position in the window grid. */
struct Window {
  int64_t b, h, wy, wx;
};

VK_HDI Window window_of(const Params& p, int64_t index) {
  Window w;
  const uint32_t per_map = (uint32_t)(p.gh * p.gw);
  const uint32_t idx = (uint32_t)index;
  const uint32_t bh = idx / per_map, wi = idx - bh * per_map;  /* once per window: plain division */
  w.b = bh / (uint32_t)p.heads;
  w.h = bh - (uint32_t)w.b * (uint32_t)p.heads;
  w.wy = wi / (uint32_t)p.gw;
  w.wx = wi - (uint32_t)w.wy * (uint32_t)p.gw;
  return w;
}

/* Token (r·W + c) at slot `slot` of window w in the shifted, padded frame; -1 for pad / slot >= n. */
VK_HDI int64_t slot_token(const Params& p, const Window& w, int slot) {
  if (slot >= p.ws * p.ws) return -1;
  /* 32-bit modulo (H, W < 2^31 is checked on the host): no 64-bit division subroutine */
  const uint32_t rp = (uint32_t)(w.wy * p.ws) + (uint32_t)(slot / p.ws);
  const uint32_t cp = (uint32_t)(w.wx * p.ws) + (uint32_t)(slot % p.ws);
  const uint32_t H = (uint32_t)p.H, W = (uint32_t)p.W, s = (uint32_t)p.shift;
  uint32_t r, c;
  if (p.pad_order == kShiftThenPad) {  /* roll the H×W map, then pad */
    r = rp < H ? (rp + s) % H : H;
    c = cp < W ? (cp + s) % W : W;
  } else {  /* pad, then roll the padded map */
    r = (rp + s) % (uint32_t)p.Hp;
    c = (cp + s) % (uint32_t)p.Wp;
  }
  return (r < H && c < W) ? (int64_t)r * p.W + c : -1;
}

/* Swin's region id (0..8) of a frame position, for the shift mask. */
VK_HDI int region(const Params& p, int64_t rp, int64_t cp) {
  const int a = rp < p.Hp - p.ws ? 0 : (rp < p.Hp - p.shift ? 1 : 2);
  const int b = cp < p.Wp - p.ws ? 0 : (cp < p.Wp - p.shift ? 1 : 2);
  return 3 * a + b;
}

VK_HDI bool vec_ok(const Params& p, int t) { return (p.vec_mask >> t) & 1u; }

/* wmma::load_matrix_sync / store_matrix_sync take a 256-bit aligned tile pointer and a row
 * stride (ldm) that is a multiple of 16 bytes. */
constexpr int kWmmaAlign = 32;

/* Shared memory of a block (its base is __align__(128)): Q, K, V [NP][kLdQKV] (dtype), then per
 * warp S [16][kLdS] (fp32) and P [16][kLdP] (dtype). Every region holds wmma tiles: the CPU
 * build checks that each starts kWmmaAlign-aligned. */
template <int WS, class T>
VK_HDI T* smem_qkv(unsigned char* smem, int which) {
  T* a = reinterpret_cast<T*>(smem) + (int64_t)which * Geo<WS>::kNP * kLdQKV;
  VK_ASSERT_SMEM_ALIGNED(smem, a, kWmmaAlign, "window Q / K / V tiles");
  return a;
}
template <int WS>
VK_HDI float* smem_s(unsigned char* smem, int warp) {
  float* a = reinterpret_cast<float*>(smem + Geo<WS>::kQKVBytes +
                                      (int64_t)warp * Geo<WS>::kWarpBytes);
  VK_ASSERT_SMEM_ALIGNED(smem, a, kWmmaAlign, "window S / O tile of a warp");
  return a;
}
template <int WS, class T>
VK_HDI T* smem_p(unsigned char* smem, int warp) {
  T* a = reinterpret_cast<T*>(smem + Geo<WS>::kQKVBytes + (int64_t)warp * Geo<WS>::kWarpBytes +
                              16 * (int64_t)Geo<WS>::kLdS * 4);
  VK_ASSERT_SMEM_ALIGNED(smem, a, kWmmaAlign, "window P tile of a warp");
  return a;
}

/* The 16×16 tile (row tile r, column tile c) of a row-major shared array with row stride ldm
 * elements: the pointer window.cu hands to wmma (a col_major operand is the same memory read
 * transposed). The CPU build, which replaces the products by loops over these tiles, checks the
 * tile pointer and ldm against wmma's alignment rules. */
template <class E>
VK_HDI E* wmma_tile(E* base, int r, int c, int ldm) {
  E* tile = base + (r * 16 * ldm + c * 16);
  VK_ASSERT_ALIGNED(tile, kWmmaAlign, "wmma tile pointer");
  VK_ASSERT_SMEM_ALIGNED(base, base + ldm, 16, "wmma row stride (ldm)");
  return tile;
}

/* Stage work item `item` (tensor, slot, 16-byte vector) of window w into shared memory. */
template <int WS, class T>
VK_HDI void stage_item(const Params& p, const Window& w, int item, unsigned char* smem) {
  constexpr int kVecs = kHeadDim / 8;
  const int which = item / (Geo<WS>::kNP * kVecs);
  const int rem = item - which * (Geo<WS>::kNP * kVecs);
  const int slot = rem / kVecs, ch = (rem - slot * kVecs) * 8;
  T* dst = smem_qkv<WS, T>(smem, which) + (int64_t)slot * kLdQKV + ch;
  const int64_t tok = slot_token(p, w, slot);
  if (tok < 0) {
    zero_chunk(dst);
    return;
  }
  const void* base = which == 0 ? p.q : (which == 1 ? p.k : p.v);
  const T* src = static_cast<const T*>(base) + w.b * p.stride[which][0] + w.h * p.stride[which][1] +
                 tok * p.stride[which][2] + (int64_t)ch * p.stride[which][3];
  gather_chunk(dst, src, p.stride[which][3], vec_ok(p, which));
}

template <int WS>
VK_HDI int stage_items() { return 3 * Geo<WS>::kNP * (kHeadDim / 8); }

/* Softmax of one query row, split over 2 lanes (part 0: even columns, part 1: odd).
 * Phase 1: logits (log2 domain) of this lane's columns into S, returns their max. */
template <int WS>
VK_HDI float row_logits(const Params& p, const Window& w, int i, int part, float* srow) {
  constexpr int N = WS * WS;
  float m = -INFINITY;
  if (i >= N) return m;
  const int ai = i / WS, bi = i % WS;
  const int64_t rpi = w.wy * WS + ai, cpi = w.wx * WS + bi;
  const int ri = p.shift ? region(p, rpi, cpi) : 0;
  for (int j = part; j < N; j += 2) {
    float z = srow[j] * p.scale_log2;
    const int aj = j / WS, bj = j % WS;
    if (p.bias_kind == kTableBias) {
      const int64_t idx = (int64_t)(ai - aj + WS - 1) * (2 * WS - 1) + (bi - bj + WS - 1);
      z += p.bias[idx * p.bias_stride[0] + w.h * p.bias_stride[1]] * 1.4426950408889634f;
    } else if (p.bias_kind == kDenseBias) {
      z += p.bias[w.h * p.bias_stride[0] + i * p.bias_stride[1] + j * p.bias_stride[2]] *
           1.4426950408889634f;
    }
    if (p.shift && region(p, w.wy * WS + aj, w.wx * WS + bj) != ri) z += p.mask_log2;
    srow[j] = z;
    m = fmaxf(m, z);
  }
  return m;
}

/* Phase 2: exp2(z - m) in place, returns this lane's partial sum. */
template <int WS>
VK_HDI float row_exp(int i, int part, float m, float* srow) {
  constexpr int N = WS * WS;
  float l = 0.0f;
  if (i >= N) return l;
  for (int j = part; j < N; j += 2) {
    srow[j] = exp2f(srow[j] - m);
    l += srow[j];
  }
  return l;
}

/* Phase 3: P = e / l in the dtype; zero for columns >= n and for rows >= n. */
template <int WS, class T>
VK_HDI void row_probs(int i, int part, float l, const float* srow, T* prow) {
  constexpr int N = WS * WS;
  const float inv = i < N ? rcp_normal(l) : 0.0f;
  for (int j = part; j < Geo<WS>::kNP; j += 2) {
    prow[j] = from_float<T>(i < N && j < N ? srow[j] * inv : 0.0f);
  }
}

/* Write lane `lane`'s half (16 channels) of output row i of the tile, from the fp32 O tile
 * (16 × 32, row stride kLdS) in shared memory. */
template <int WS, class T>
VK_HDI void write_row(const Params& p, const Window& w, int i, int half, const float* orow) {
  const int64_t tok = slot_token(p, w, i);
  if (tok < 0) return;  /* tile padding or a pad query: no output */
  T* o = static_cast<T*>(p.o) + w.b * p.stride[3][0] + w.h * p.stride[3][1] + tok * p.stride[3][2];
  for (int c = half * 16; c < half * 16 + 16; c += 8) {
    store_chunk_float(o + (int64_t)c * p.stride[3][3], p.stride[3][3], vec_ok(p, 3), orow + c);
  }
}

}  // namespace win
}  // namespace vk

#endif /* VITKERN_WINDOW_WINDOW_CORE_H_ */
