// HiLo Lo-Fi attention forward with in-kernel pooling (csrc/hilo/lofi_core.h holds the
// per-thread program, shared with the CPU test build); this file is the GPU glue only.
//
// Register budget, checked by tests/test_csrc_build.py from `ptxas -v` (sm_80, sm_90):
//   VK_REG_BUDGET vk_lofi_fwd_kernel 128
// Why: 2 blocks of 256 threads per SM (25% occupancy). Each thread keeps its 16 query channels,
// 16 accumulators and a 32-key score row in registers (~70 live values); the key chunk in shared
// memory is reused by every query of the block, so the kernel is bound by FMA issue, not by
// latency, and does not need more resident warps. ptxas takes what the __launch_bounds__ cap
// allows (127 registers on sm_80 and sm_90 for every dtype, no spills, no stack frame). Head dims
// that are not 16 times a power of two (48, 80, 96, 112) run with the next power-of-two lane
// count and idle padding lanes: no extra per-thread state, the same registers; the padding lanes
// cost issue slots (d = 80: 3 of 8 lanes idle), not registers.
#include "hilo/lofi.h"

#include "hilo/lofi_core.h"

namespace {

using namespace vk;
using namespace vk::lofi;

__device__ __forceinline__ float lanes_sum(float x, int lanes) {
  VK_UNROLL
  for (int off = 1; off < kMaxLanes; off <<= 1) {
    if (off < lanes) x += __shfl_xor_sync(0xffffffffu, x, off);
  }
  return x;
}

template <class T>
__global__ void __launch_bounds__(kBlockThreads, 2)
vk_lofi_fwd_kernel(const Params p) {
  extern __shared__ uint4 vk_lofi_smem[];
  float* smem = reinterpret_cast<float*>(vk_lofi_smem);
  const Thread th = thread_coords(p, (int64_t)blockIdx.x, (int)threadIdx.x);
  State st;
  init_state<T>(p, th, st);
  const int items = stage_items(p);
  for (int64_t j0 = 0; j0 < p.M; j0 += kKeyChunk) {
    __syncthreads();  // the previous chunk is no longer read
    for (int it = (int)threadIdx.x; it < items; it += (int)blockDim.x) {
      stage_item<T>(p, th.b, th.h, j0, it, smem);
    }
    __syncthreads();
    float sc[kKeyChunk];
    partial_scores(p, th, st, smem, sc);
    VK_UNROLL
    for (int j = 0; j < kKeyChunk; ++j) sc[j] = lanes_sum(sc[j], p.lanes);
    update(p, th, st, smem, j0, sc);
  }
  finish<T>(p, th, st);
}

template <class T>
vitkern_status launch(const Params& p, cudaStream_t stream) {
  vk_lofi_fwd_kernel<T><<<(unsigned)p.grid, (unsigned)p.block_threads, (size_t)p.smem_bytes,
                          stream>>>(p);
  VK_CUDA_CHECK_LAUNCH();
  return VK_STATUS_SUCCESS;
}

}  // namespace

extern "C" vitkern_status vitkern_lofi_supported(int32_t dtype, int64_t head_dim, int64_t pool,
                                                 char* why, size_t why_len) {
  return supported(dtype, head_dim, pool, why, why_len);
}

extern "C" vitkern_status vitkern_lofi_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                           const vitkern_tensor* v, const vitkern_tensor* o,
                                           int64_t H, int64_t W, int64_t window_size,
                                           int32_t kv_pooled, float scale, cudaStream_t stream,
                                           char* why, size_t why_len) {
  Params p;
  VK_CHECK(make_params(&p, q, k, v, o, H, W, window_size, kv_pooled, scale, why, why_len));
  if (p.grid == 0) return VK_STATUS_SUCCESS;
  switch (p.dtype) {
    case VK_DTYPE_FP32: return launch<float>(p, stream);
    case VK_DTYPE_FP16: return launch<half_t>(p, stream);
    case VK_DTYPE_BF16: return launch<bf16_t>(p, stream);
    default: return VK_STATUS_UNSUPPORTED_DTYPE;
  }
}
