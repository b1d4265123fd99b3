#include "common/fill.h"

namespace {

// A grid-stride store loop needs next to nothing; 32 registers keep full occupancy
// (ptxas gate in tests/test_csrc_build.py):
//   VK_REG_BUDGET vk_fill_f32_kernel 32
constexpr int kFillThreads = 256;
// Grid-stride loop: a bounded grid covers any n (int64) without overflowing gridDim.x.
constexpr int64_t kFillMaxBlocks = 65535;

__global__ void __launch_bounds__(kFillThreads)
vk_fill_f32_kernel(float* __restrict__ ptr, int64_t n, float value) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    ptr[i] = value;
  }
}

}  // namespace

extern "C" vitkern_status vitkern_fill_f32(float* ptr, int64_t n, float value,
                                           cudaStream_t stream) {
  if (n < 0) return VK_STATUS_INVALID_ARGUMENT;
  if (n == 0) return VK_STATUS_SUCCESS;
  if (ptr == nullptr) return VK_STATUS_INVALID_ARGUMENT;
  int64_t blocks = vk_cdiv(n, kFillThreads);
  if (blocks > kFillMaxBlocks) blocks = kFillMaxBlocks;
  vk_fill_f32_kernel<<<(unsigned)blocks, kFillThreads, 0, stream>>>(ptr, n, value);
  VK_CUDA_CHECK_LAUNCH();
  return VK_STATUS_SUCCESS;
}
