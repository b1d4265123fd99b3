// CPU build of the Swin window kernel's per-thread program (csrc/window/window_core.h), for
// tests/test_csrc_window.py (ctypes; host C++ compiler, no CUDA). A launch runs exactly as in
// window.cu -- same make_params(), the same grid-stride walk over windows, the same staging,
// softmax and output phases per thread on the same shared-memory layout -- except for the GPU
// glue: the two wmma products of a query tile are loops over the same 16×16 shared-memory tiles
// (wmma_tile: the pointers window.cu hands to wmma, alignment-checked; fp32 accumulation), the
// shuffle between a row's two lanes is a sum / max of both, barriers are phase boundaries. A
// misaligned vector access or tile returns VK_STATUS_MISALIGNED (csrc/common/numeric.h).
#include "host_twin.h"
#include "window/window_core.h"

namespace {

using namespace vk;
using namespace vk::win;

constexpr size_t kSmemBaseAlign = 128;  // window.cu: extern __shared__ __align__(128)

// wmma::mma_sync on 16×16 tiles: acc += A B, A row-major (stride lda), B row-major or col-major
// (stride ldb), as loaded by load_matrix_sync from the same pointers.
template <class T>
void mma_tile(float (&acc)[16][16], const T* a, int lda, const T* b, int ldb, bool b_col_major) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = acc[i][j];
      for (int k = 0; k < 16; ++k) {
        sum += to_float(a[i * lda + k]) * to_float(b_col_major ? b[j * ldb + k] : b[k * ldb + j]);
      }
      acc[i][j] = sum;
    }
  }
}

// wmma::store_matrix_sync(dst, acc, ldm, mem_row_major)
void store_tile(float* dst, int ldm, const float (&acc)[16][16]) {
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) dst[i * ldm + j] = acc[i][j];
  }
}

template <int WS, class T>
void run(const Params& p, int grid) {
  using G = Geo<WS>;
  vk_host::SharedMemory mem(G::kSmemBytes, kSmemBaseAlign);
  unsigned char* smem = mem.ptr;
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
          float acc[16][16];
          for (int nt = 0; nt < G::kTiles; ++nt) {  // wmma: S = Q_tile K^T
            memset(acc, 0, sizeof acc);
            for (int kk = 0; kk < kHeadDim / 16; ++kk) {
              mma_tile(acc, wmma_tile(Q, mt, kk, kLdQKV), kLdQKV, wmma_tile(K, nt, kk, kLdQKV),
                       kLdQKV, true);
            }
            store_tile(wmma_tile(S, 0, nt, G::kLdS), G::kLdS, acc);
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
          for (int nt = 0; nt < kHeadDim / 16; ++nt) {  // wmma: O = P V into S's space
            memset(acc, 0, sizeof acc);
            for (int kk = 0; kk < G::kTiles; ++kk) {
              mma_tile(acc, wmma_tile(P, 0, kk, G::kLdP), G::kLdP, wmma_tile(V, kk, nt, kLdQKV),
                       kLdQKV, false);
            }
            store_tile(wmma_tile(S, 0, nt, G::kLdS), G::kLdS, acc);
          }
          for (int lane = 0; lane < 32; ++lane) {
            write_row<WS, T>(p, w, mt * 16 + (lane >> 1), lane & 1, S + (lane >> 1) * G::kLdS);
          }
        }
      }
    }
  }
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
  return vk_host::guarded(why, n, [&] {
    if (ws == 7) {
      run_dtype<7>(p, p.grid);
    } else {
      run_dtype<12>(p, p.grid);
    }
    return (int)VK_STATUS_SUCCESS;
  });
}

}  // extern "C"
