/* Swin window attention forward (inference) on tensor cores: ws = 7 or 12, head_dim 32,
 * float16 / bfloat16, behind the C ABI. See csrc/window/window_core.h for the design and the
 * exact semantics (those of vitkern.reference.window.window_attention, active_windows aside).
 *
 * q, k, v, o: (B, heads, H·W, 32) descriptors (strides in elements, one dtype); `window_size` and
 * `shift` are the effective ones (Swin's clamp to the map already applied by the caller);
 * pad_order 0 = "shift_then_pad", 1 = "pad_then_shift"; bias: NULL, or float32 Swin table
 * ((2ws-1)², heads) or dense (heads, ws², ws²). */
#ifndef VITKERN_WINDOW_WINDOW_H_
#define VITKERN_WINDOW_WINDOW_H_

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

vitkern_status vitkern_window_supported(int32_t dtype, int64_t head_dim, int64_t window_size,
                                        char* why, size_t why_len);

#if VK_HAS_CUDA_RUNTIME
vitkern_status vitkern_window_fwd(const vitkern_tensor* q, const vitkern_tensor* k,
                                  const vitkern_tensor* v, const vitkern_tensor* o,
                                  const vitkern_tensor* bias, int64_t H, int64_t W,
                                  int64_t window_size, int64_t shift, int32_t pad_order,
                                  float mask_value, float scale, cudaStream_t stream, char* why,
                                  size_t why_len);
#endif

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VITKERN_WINDOW_WINDOW_H_ */
