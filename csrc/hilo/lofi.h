/* HiLo Lo-Fi attention forward (queries attend to s×s average-pooled keys / values, pooled
 * inside the kernel), CUDA kernel behind the C ABI. See csrc/hilo/lofi_core.h for the design.
 *
 * q, o: (B, heads, H·W, d); k, v: the same full-resolution map (pooled in the kernel with
 * factor window_size, zero padding right / bottom with divisor s²), or with kv_pooled = 1 the
 * (B, heads, ceil(H/s)·ceil(W/s), d) pooled map as given. Strides in elements, one dtype.
 * head_dim: any multiple of 16 from 16 to 128 (16 channels per lane; the lane count is rounded up
 * to a power of two and shared-memory rows are zero-padded to 16 · lanes channels). Pooling
 * factor 1 … 8 in the kernel; any window_size with kv_pooled = 1. */
#ifndef VITKERN_HILO_LOFI_H_
#define VITKERN_HILO_LOFI_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* VK_STATUS_SUCCESS when the kernel takes (dtype, head_dim, pooling factor); else the reason. */
vitkern_status vitkern_lofi_supported(int32_t dtype, int64_t head_dim, int64_t pool, char* why,
                                      size_t why_len);

#if VK_HAS_CUDA_RUNTIME
vitkern_status vitkern_lofi_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                const vitkern_tensor* v, const vitkern_tensor* o, int64_t H,
                                int64_t W, int64_t window_size, int32_t kv_pooled, float scale,
                                cudaStream_t stream, char* why, size_t why_len);
#endif

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VITKERN_HILO_LOFI_H_ */
