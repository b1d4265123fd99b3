/* Fill a float32 device buffer: the smallest real kernel, a smoke test of the build, the C ABI
 * and the stream hand-over on a GPU machine. */
#ifndef VITKERN_COMMON_FILL_H_
#define VITKERN_COMMON_FILL_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

#if VK_HAS_CUDA_RUNTIME
/* ptr[i] = value for 0 <= i < n, asynchronously on `stream`. n == 0 is a no-op. */
vitkern_status vitkern_fill_f32(float* ptr, int64_t n, float value, cudaStream_t stream);
#endif

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VITKERN_COMMON_FILL_H_ */
