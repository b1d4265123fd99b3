// CPU build of the Swin window kernel's per-thread program (csrc/window/window_core.h), for
// tests/test_csrc_window.py (ctypes; host C++ compiler, no CUDA). A launch runs exactly as in
// window.cu -- same make_params(), the same grid-stride walk over windows, the same staging,
// softmax and output phases per thread on the same shared-memory layout -- except for the GPU
// glue: the two wmma products of a query tile are loops over the same shared-memory tiles (fp32
// accumulation), the shuffle between a row's two lanes is a sum / max of both, barriers are
// phase boundaries.
#include <stdlib.h>

#include <vector>

#include "window/window_core.h"

namespace {

using namespace vk;
using namespace vk::win;

template <int WS, class T>
void run(const Params& p, int grid) {
  using G = Geo<WS>;
  const size_t bytes = (size_t)(G::kSmemBytes + 15) / 16 * 16;
  unsigned char* smem = static_cast<unsigned char*>(aligned_alloc(16, bytes));
  memset(smem, 0xff, bytes);  // NaN garbage: every value read must have been written
  const T* Q = smem_qkv<WS, T>(smem, 0);
  const T* K = smem_qkv<WS, T>(smem, 1);
  const T* V = smem_qkv<WS, T>(smem, 2);
  constexpr int kSteps = (G::kTiles + kWarps - 1) / kWarps;
  for (int blk = 0; blk < grid; ++blk) {
    for (int64_t wi = blk; wi < p.n_windows; wi += grid) {
      const Window w = window_of(p, wi);
      for (int t = 0; t < kThreads; ++t) {
        for (int it = t; it < stage_items<WS>(); it += kThreads) stage_item<WS, T>(p, w, it, smem);
      }
      for (int step = 0; step < kSteps; ++step) {
        for (int warp = 0; warp < kWarps; ++warp) {
          const int mt = warp + step * kWarps;
          if (mt >= G::kTiles) continue;
          float* S = smem_s<WS>(smem, warp);
          T* P = smem_p<WS, T>(smem, warp);
          for (int rr = 0; rr < 16; ++rr) {  // wmma: S = Q_tile K^T
            for (int j = 0; j < G::kNP; ++j) {
              float acc = 0.0f;
              for (int c = 0; c < kHeadDim; ++c) {
                acc += to_float(Q[(mt * 16 + rr) * kLdQKV + c]) * to_float(K[j * kLdQKV + c]);
              }
              S[rr * G::kLdS + j] = acc;
            }
          }
          float m[32], l[32];
          for (int lane = 0; lane < 32; ++lane) {
            m[lane] = row_logits<WS>(p, w, mt * 16 + (lane >> 1), lane & 1, S + (lane >> 1) * G::kLdS);
          }
          for (int lane = 0; lane < 32; ++lane) {
            const float mm = fmaxf(m[lane], m[lane ^ 1]);
            l[lane] = row_exp<WS>(mt * 16 + (lane >> 1), lane & 1, mm, S + (lane >> 1) * G::kLdS);
          }
          for (int lane = 0; lane < 32; ++lane) {
            row_probs<WS, T>(mt * 16 + (lane >> 1), lane & 1, l[lane] + l[lane ^ 1],
                             S + (lane >> 1) * G::kLdS, P + (lane >> 1) * G::kLdP);
          }
          for (int rr = 0; rr < 16; ++rr) {  // wmma: O = P V into S's space
            for (int c = 0; c < kHeadDim; ++c) {
              float acc = 0.0f;
              for (int j = 0; j < G::kNP; ++j) {
                acc += to_float(P[rr * G::kLdP + j]) * to_float(V[j * kLdQKV + c]);
              }
              S[rr * G::kLdS + c] = acc;
            }
          }
          for (int lane = 0; lane < 32; ++lane) {
            write_row<WS, T>(p, w, mt * 16 + (lane >> 1), lane & 1, S + (lane >> 1) * G::kLdS);
          }
        }
      }
    }
  }
  free(smem);
}

template <int WS>
void run_dtype(const Params& p, int grid) {
  if (p.dtype == VK_DTYPE_FP16) {
    run<WS, half_t>(p, grid);
  } else {
    run<WS, bf16_t>(p, grid);
  }
}

}  // namespace

extern "C" {

int vk_host_window_supported(int32_t dtype, int64_t d, int64_t ws, char* why, size_t n) {
  return supported(dtype, d, ws, why, n);
}

// max_blocks: the grid cap (the GPU launcher derives it from the occupancy); a small one makes
// every block walk several windows, as on the GPU.
int vk_host_window_fwd(const vitkern_tensor* q, const vitkern_tensor* k, const vitkern_tensor* v,
                       const vitkern_tensor* o, const vitkern_tensor* bias, int64_t H, int64_t W,
                       int64_t ws, int64_t shift, int32_t pad_order, float mask_value,
                       float scale, int64_t max_blocks, char* why, size_t n) {
  Params p;
  VK_CHECK(make_params(&p, q, k, v, o, bias, H, W, ws, shift, pad_order, mask_value, scale,
                       max_blocks, why, n));
  if (p.grid == 0) return VK_STATUS_SUCCESS;
  if (ws == 7) {
    run_dtype<7>(p, p.grid);
  } else {
    run_dtype<12>(p, p.grid);
  }
  return VK_STATUS_SUCCESS;
}

}  // extern "C"
