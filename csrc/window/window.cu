// Swin window attention forward on tensor cores (wmma 16x16x16, fp32 accumulation). The
// per-thread program (token mapping of the shifted / padded frame, bias, shift mask, softmax,
// output) is csrc/window/window_core.h, shared with the CPU test build; this file adds the GPU
// glue: the two wmma products per query tile, barriers, one shuffle, the launch.
//
// Register budget, checked by tests/test_csrc_build.py from `ptxas -v` (sm_80, sm_90):
//   VK_REG_BUDGET vk_window_fwd_kernel 80
// Why: blocks are 4 warps, and shared memory should bound residency, not registers: 42 KB per
// block for ws = 7 lets 5 blocks share an H100 SM (5 x 128 threads x 80 registers = 51K of the
// 64K register file; 100 registers would cut it to 4); ws = 12 (90 KB) fits 2. It measures 40-64.
#include "window/window.h"

#include <mma.h>

#include "window/window_core.h"

namespace {

using namespace vk;
using namespace vk::win;

template <int WS, class T>
__global__ void __launch_bounds__(kThreads)
vk_window_fwd_kernel(const Params p) {
  using namespace nvcuda;
  using G = Geo<WS>;
  extern __shared__ __align__(128) uint4 vk_window_smem[];  // wmma tiles: 32-byte aligned
  unsigned char* smem = reinterpret_cast<unsigned char*>(vk_window_smem);
  const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
  const T* Q = smem_qkv<WS, T>(smem, 0);
  const T* K = smem_qkv<WS, T>(smem, 1);
  const T* V = smem_qkv<WS, T>(smem, 2);
  float* S = smem_s<WS>(smem, warp);
  T* P = smem_p<WS, T>(smem, warp);
  const int r = lane >> 1, part = lane & 1;  // softmax / output: 2 lanes per tile row

  for (int64_t wi = blockIdx.x; wi < p.n_windows; wi += gridDim.x) {  // several windows per block
    const Window w = window_of(p, wi);
    __syncthreads();  // the previous window's tiles are no longer read
    for (int it = (int)threadIdx.x; it < stage_items<WS>(); it += kThreads) {
      stage_item<WS, T>(p, w, it, smem);
    }
    __syncthreads();
    // Every warp runs the same number of tile steps (idle ones skip the work), so block
    // barriers order shared memory between the lanes of a warp: a __syncwarp here would compile
    // to a convergence subroutine call (a stack frame on sm_80), bar.sync does not.
    constexpr int kSteps = (G::kTiles + kWarps - 1) / kWarps;
    for (int step = 0; step < kSteps; ++step) {
      const int mt = warp + step * kWarps;
      const bool busy = mt < G::kTiles;  // warp-uniform
      const int i = mt * 16 + r;
      float* srow = S + r * G::kLdS;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (busy) {
        for (int nt = 0; nt < G::kTiles; ++nt) {  // S = Q_tile K^T
          wmma::fill_fragment(acc, 0.0f);
          VK_UNROLL
          for (int kk = 0; kk < kHeadDim / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
            wmma::load_matrix_sync(a, wmma_tile(Q, mt, kk, kLdQKV), kLdQKV);
            wmma::load_matrix_sync(b, wmma_tile(K, nt, kk, kLdQKV), kLdQKV);
            wmma::mma_sync(acc, a, b, acc);
          }
          wmma::store_matrix_sync(wmma_tile(S, 0, nt, G::kLdS), acc, G::kLdS,
                                  wmma::mem_row_major);
        }
      }
      __syncthreads();
      float m = busy ? row_logits<WS>(p, w, i, part, srow) : 0.0f;
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      float l = busy ? row_exp<WS>(i, part, m, srow) : 0.0f;
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      if (busy) row_probs<WS, T>(i, part, l, srow, P + r * G::kLdP);
      __syncthreads();
      if (busy) {
        VK_UNROLL
        for (int nt = 0; nt < kHeadDim / 16; ++nt) {  // O = P V, into S's space (S is consumed)
          wmma::fill_fragment(acc, 0.0f);
          for (int kk = 0; kk < G::kTiles; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(a, wmma_tile(P, 0, kk, G::kLdP), G::kLdP);
            wmma::load_matrix_sync(b, wmma_tile(V, kk, nt, kLdQKV), kLdQKV);
            wmma::mma_sync(acc, a, b, acc);
          }
          wmma::store_matrix_sync(wmma_tile(S, 0, nt, G::kLdS), acc, G::kLdS,
                                  wmma::mem_row_major);
        }
      }
      __syncthreads();
      if (busy) write_row<WS, T>(p, w, i, part, srow);
      __syncthreads();  // S and P are rewritten by the next step / window
    }
  }
}

template <int WS, class T>
vitkern_status launch(Params& p, cudaStream_t stream) {
  auto kernel = vk_window_fwd_kernel<WS, T>;
  const int smem = (int)Geo<WS>::kSmemBytes;
  if (smem > 48 * 1024) {  // ws = 12 needs the opt-in shared-memory carve-out (sm_80: 163 KB)
    VK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  int device = 0, sms = 0, per_sm = 0;
  VK_CUDA_CHECK(cudaGetDevice(&device));
  VK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  VK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  if (per_sm < 1) return VK_STATUS_UNSUPPORTED_SHAPE;
  const int64_t max_blocks = 2LL * sms * per_sm;  // two waves; each block walks several windows
  if (p.grid > max_blocks) p.grid = (int32_t)max_blocks;
  kernel<<<(unsigned)p.grid, kThreads, (size_t)smem, stream>>>(p);
  VK_CUDA_CHECK_LAUNCH();
  return VK_STATUS_SUCCESS;
}

template <int WS>
vitkern_status launch_dtype(Params& p, cudaStream_t stream) {
  return p.dtype == VK_DTYPE_FP16 ? launch<WS, half_t>(p, stream) : launch<WS, bf16_t>(p, stream);
}

}  // namespace

extern "C" vitkern_status vitkern_window_supported(int32_t dtype, int64_t head_dim,
                                                   int64_t window_size, char* why,
                                                   size_t why_len) {
  return supported(dtype, head_dim, window_size, why, why_len);
}

extern "C" vitkern_status vitkern_window_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                             const vitkern_tensor* v, const vitkern_tensor* o,
                                             const vitkern_tensor* bias, int64_t H, int64_t W,
                                             int64_t window_size, int64_t shift,
                                             int32_t pad_order, float mask_value, float scale,
                                             cudaStream_t stream, char* why, size_t why_len) {
  Params p;
  VK_CHECK(make_params(&p, q, k, v, o, bias, H, W, window_size, shift, pad_order, mask_value,
                       scale, 0x7fffffffLL, why, why_len));
  if (p.grid == 0) return VK_STATUS_SUCCESS;
  return window_size == 7 ? launch_dtype<7>(p, stream) : launch_dtype<12>(p, stream);
}
