/* HiLo Hi-Fi attention (windows of s×s tokens, s <= 4), CUDA kernels behind the C ABI.
 *
 * Tensors are (B, heads, N, d) descriptors (N = H·W tokens in raster order; strides in elements,
 * any layout, e.g. permuted views of a (B, N, 3·h_dim) projection), one dtype (fp32 / fp16 /
 * bf16). Maps not divisible by s are zero-padded right / bottom (LITv2 detection semantics:
 * unmasked zero keys / values). Every call validates its arguments before touching the GPU and
 * returns a vitkern_status; `why` (may be NULL) receives a reason on failure. */
#ifndef VITKERN_HILO_HIFI_H_
#define VITKERN_HILO_HIFI_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* VK_STATUS_SUCCESS when the kernels take (dtype, head_dim, window_size); else the reason. */
vitkern_status vitkern_hifi_supported(int32_t dtype, int64_t head_dim, int64_t window_size,
                                      int32_t backward, char* why, size_t why_len);

#if VK_HAS_CUDA_RUNTIME
/* o = softmax(scale · q kᵀ) v inside each window, asynchronously on `stream`. */
vitkern_status vitkern_hifi_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                const vitkern_tensor* v, const vitkern_tensor* o, int64_t H,
                                int64_t W, int64_t window_size, float scale, cudaStream_t stream,
                                char* why, size_t why_len);

/* dq, dk, dv from dO (scores recomputed from q, k; nothing saved by the forward is needed). */
vitkern_status vitkern_hifi_bwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                const vitkern_tensor* v, const vitkern_tensor* dout,
                                const vitkern_tensor* dq, const vitkern_tensor* dk,
                                const vitkern_tensor* dv, int64_t H, int64_t W,
                                int64_t window_size, float scale, cudaStream_t stream, char* why,
                                size_t why_len);
#endif

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VITKERN_HILO_HIFI_H_ */
