// HiLo Hi-Fi attention kernels (s <= 4): many tiny windows per block, L lanes per token, fp32
// softmax in registers, q/k/v read once in 16-byte vectors, outputs written once. The per-thread
// program (index math, padding, softmax and its gradient) is csrc/hilo/hifi_core.h, shared with
// the CPU test build; this file adds only the GPU glue: shared memory, barriers, the shuffle
// sum over a token's lanes, the launch and its error checks.
//
// Register budgets, checked by tests/test_csrc_build.py from `ptxas -v` for sm_80 and sm_90
// (a kernel above its budget, or with any spill or stack frame, fails CI):
//   VK_REG_BUDGET vk_hifi_fwd_kernel 64
//   VK_REG_BUDGET vk_hifi_bwd_kernel 128
// Why: the kernels are memory-bound and hide latency with resident warps. The forward needs 4
// blocks of 256 threads per SM (50% occupancy; 1024 x 64 registers = the 64K register file) to
// keep enough 16-byte loads in flight; it measures 40-64 registers. The backward moves 7 tensors
// instead of 4 per thread and issues 4 independent loads per lane vector, so 2 blocks per SM
// (25%, <= 128 registers) suffice; its 16 + 16 fp32 score rows (s = 4) put it at 56-106.
// __launch_bounds__ below asks ptxas for exactly these limits.
#include "hilo/hifi.h"

#include "hilo/hifi_core.h"

namespace {

using namespace vk;
using namespace vk::hifi;

// Sum of x over the `lanes` threads of one token: L-aligned lane groups inside a warp, so xor
// shuffles with offsets < L never leave the group. Every thread of the warp must call this
// (idle threads pass zeros): the full mask is used.
__device__ __forceinline__ float lanes_sum(float x, int lanes) {
VK_UNROLL
  for (int off = 1; off < kMaxLanes; off <<= 1) {
    if (off < lanes) x += __shfl_xor_sync(0xffffffffu, x, off);
  }
  return x;
}

template <class T, int S>
__global__ void __launch_bounds__(kTargetBlockThreads, 4)
vk_hifi_fwd_kernel(const Params p) {
  extern __shared__ uint4 vk_hifi_smem[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(vk_hifi_smem);
  constexpr int NK = S * S;  // 0: runtime window size (s = 1, 3)
  constexpr int NKMAX = S > 0 ? NK : kMaxNK;
  const Thread th = thread_coords<S>(p, (int64_t)blockIdx.x, (int)threadIdx.x);
  const int slots[2] = {kK, kV};
  stage<T>(p, th, smem, slots, 2);
  __syncthreads();
  float sc[NKMAX];
  fwd_partial_scores<T, NK>(p, th, smem, sc);
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) sc[j] = lanes_sum(sc[j], p.lanes);
  fwd_finish<T, NK>(p, th, smem, sc);
}

template <class T, int S>
__global__ void __launch_bounds__(kTargetBlockThreads, 2)
vk_hifi_bwd_kernel(const Params p) {
  extern __shared__ uint4 vk_hifi_smem[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(vk_hifi_smem);
  constexpr int NK = S * S;
  constexpr int NKMAX = S > 0 ? NK : kMaxNK;
  const Thread th = thread_coords<S>(p, (int64_t)blockIdx.x, (int)threadIdx.x);
  const int slots[4] = {kQ, kK, kV, kDO};
  stage<T>(p, th, smem, slots, 4);
  __syncthreads();
  float sc[NKMAX], dp[NKMAX];
  bwd_partial<T, NK>(p, th, smem, sc, dp);
VK_UNROLL
  for (int j = 0; j < NKMAX; ++j) {
    sc[j] = lanes_sum(sc[j], p.lanes);
    dp[j] = lanes_sum(dp[j], p.lanes);
  }
  bwd_rows<T, NK>(p, th, smem, sc, dp);
  __syncthreads();
  bwd_columns<T, NK>(p, th, smem);
}

template <class T, int S>
vitkern_status launch(const Params& p, cudaStream_t stream) {
  const dim3 grid((unsigned)p.grid), block((unsigned)p.block_threads);
  if (p.backward) {
    vk_hifi_bwd_kernel<T, S><<<grid, block, (size_t)p.smem_bytes, stream>>>(p);
  } else {
    vk_hifi_fwd_kernel<T, S><<<grid, block, (size_t)p.smem_bytes, stream>>>(p);
  }
  VK_CUDA_CHECK_LAUNCH();
  return VK_STATUS_SUCCESS;
}

template <class T>
vitkern_status launch_s(const Params& p, cudaStream_t stream) {
  switch (p.s) {
    case 2: return launch<T, 2>(p, stream);   // LITv2's window size
    case 4: return launch<T, 4>(p, stream);
    default: return launch<T, 0>(p, stream);  // s = 1, 3: runtime window size
  }
}

vitkern_status run(const Params& p, cudaStream_t stream) {
  if (p.grid == 0) return VK_STATUS_SUCCESS;  // empty batch / heads
  switch (p.dtype) {
    case VK_DTYPE_FP32: return launch_s<float>(p, stream);
    case VK_DTYPE_FP16: return launch_s<half_t>(p, stream);
    case VK_DTYPE_BF16: return launch_s<bf16_t>(p, stream);
    default: return VK_STATUS_UNSUPPORTED_DTYPE;
  }
}

}  // namespace

extern "C" vitkern_status vitkern_hifi_supported(int32_t dtype, int64_t head_dim,
                                                 int64_t window_size, int32_t backward,
                                                 char* why, size_t why_len) {
  return supported(dtype, head_dim, window_size, backward, why, why_len);
}

extern "C" vitkern_status vitkern_hifi_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                           const vitkern_tensor* v, const vitkern_tensor* o,
                                           int64_t H, int64_t W, int64_t window_size, float scale,
                                           cudaStream_t stream, char* why, size_t why_len) {
  const vitkern_tensor* t[4] = {q, k, v, o};
  Params p;
  VK_CHECK(make_params(&p, t, 0, H, W, window_size, scale, why, why_len));
  return run(p, stream);
}

extern "C" vitkern_status vitkern_hifi_bwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                           const vitkern_tensor* v, const vitkern_tensor* dout,
                                           const vitkern_tensor* dq, const vitkern_tensor* dk,
                                           const vitkern_tensor* dv, int64_t H, int64_t W,
                                           int64_t window_size, float scale, cudaStream_t stream,
                                           char* why, size_t why_len) {
  const vitkern_tensor* t[7] = {q, k, v, dout, dq, dk, dv};
  Params p;
  VK_CHECK(make_params(&p, t, 1, H, W, window_size, scale, why, why_len));
  return run(p, stream);
}
