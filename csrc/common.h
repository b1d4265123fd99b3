/*
 * vitkern C ABI: the only header every kernel in csrc/ shares.
 *
 * Torch-free by design: kernels take raw device pointers, sizes, strides (in elements), a dtype
 * code and a cudaStream_t, and report failures as a status code -- they never throw and never
 * abort the process. This header compiles as C11, as C++17 and under nvcc:
 *
 *   - without any CUDA header (the dtype/status enums, the tensor descriptor and the
 *     VK_HOST_DEVICE index math, usable and testable on the CPU);
 *   - with the CUDA runtime API, when compiled by nvcc or with VK_WITH_CUDA_RUNTIME defined
 *     (CMakeLists.txt defines it for every source of vitkern._C): adds VK_CUDA_CHECK and the
 *     CUDA error names in vitkern_status_string.
 *
 * Never include torch, ATen, c10 or pybind11 here or in any kernel source.
 */
#ifndef VITKERN_COMMON_H_
#define VITKERN_COMMON_H_

#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(VK_WITH_CUDA_RUNTIME)
#include <cuda_runtime_api.h>
#define VK_HAS_CUDA_RUNTIME 1
#else
#define VK_HAS_CUDA_RUNTIME 0
#endif

/* Functions usable from host code and from device code (index math, descriptor helpers). */
#if defined(__CUDACC__)
#define VK_HOST_DEVICE __host__ __device__
#else
#define VK_HOST_DEVICE
#endif

/* Header-only helpers: internal linkage, so every translation unit gets its own copy. */
#define VK_INLINE static inline

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* dtype codes (stable ABI: the Python side passes these integers)                             */
/* ------------------------------------------------------------------------------------------ */
typedef enum vitkern_dtype {
  VK_DTYPE_FP32 = 0,
  VK_DTYPE_FP16 = 1,
  VK_DTYPE_BF16 = 2
} vitkern_dtype;

#define VK_NUM_DTYPES 3

/* Size in bytes of one element of `dtype`; 0 for an unknown code. */
VK_HOST_DEVICE VK_INLINE int64_t vk_dtype_size(int32_t dtype) {
  return dtype == VK_DTYPE_FP32 ? 4 : (dtype == VK_DTYPE_FP16 || dtype == VK_DTYPE_BF16) ? 2 : 0;
}

VK_INLINE const char* vk_dtype_name(int32_t dtype) {
  switch (dtype) {
    case VK_DTYPE_FP32: return "float32";
    case VK_DTYPE_FP16: return "float16";
    case VK_DTYPE_BF16: return "bfloat16";
    default: return "unknown dtype";
  }
}

/* ------------------------------------------------------------------------------------------ */
/* status codes                                                                                */
/* ------------------------------------------------------------------------------------------ */
/* Every entry point returns a vitkern_status: VK_STATUS_SUCCESS, one of the codes below, or
 * VK_STATUS_CUDA_ERROR_BASE + (cudaError_t) for a failure reported by the CUDA runtime. */
typedef int32_t vitkern_status;

enum vitkern_status_code {
  VK_STATUS_SUCCESS = 0,
  VK_STATUS_INVALID_ARGUMENT = 1,   /* null pointer, negative size, bad stride, ... */
  VK_STATUS_UNSUPPORTED_DTYPE = 2,  /* dtype code not handled by this kernel */
  VK_STATUS_UNSUPPORTED_SHAPE = 3,  /* e.g. head_dim this kernel was not instantiated for */
  VK_STATUS_MISALIGNED = 4,         /* pointer or stride not aligned for vectorised access */
  VK_STATUS_NOT_IMPLEMENTED = 5,
  VK_STATUS_NO_DEVICE = 6,          /* no usable CUDA device / driver */
  VK_STATUS_CUDA_ERROR_BASE = 1000  /* + cudaError_t */
};

VK_HOST_DEVICE VK_INLINE vitkern_status vk_status_from_cuda(int cuda_error) {
  return cuda_error == 0 ? VK_STATUS_SUCCESS : (vitkern_status)(VK_STATUS_CUDA_ERROR_BASE + cuda_error);
}

VK_HOST_DEVICE VK_INLINE int vk_status_is_cuda(vitkern_status s) {
  return s >= VK_STATUS_CUDA_ERROR_BASE;
}

/* Human-readable message for a status code (static storage, never NULL). */
VK_INLINE const char* vitkern_status_string(vitkern_status s) {
  switch (s) {
    case VK_STATUS_SUCCESS: return "success";
    case VK_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case VK_STATUS_UNSUPPORTED_DTYPE: return "unsupported dtype";
    case VK_STATUS_UNSUPPORTED_SHAPE: return "unsupported shape";
    case VK_STATUS_MISALIGNED: return "misaligned pointer or stride";
    case VK_STATUS_NOT_IMPLEMENTED: return "not implemented";
    case VK_STATUS_NO_DEVICE: return "no usable CUDA device";
    default: break;
  }
  if (vk_status_is_cuda(s)) {
#if VK_HAS_CUDA_RUNTIME
    return cudaGetErrorString((cudaError_t)(s - VK_STATUS_CUDA_ERROR_BASE));
#else
    return "CUDA runtime error";
#endif
  }
  return "unknown vitkern status";
}

/* Propagate a CUDA runtime failure as a vitkern_status from the enclosing function (which must
 * return vitkern_status). Never aborts. Also clears the runtime's per-thread last-error slot so
 * that the same error is not reported again by a later check. */
#if VK_HAS_CUDA_RUNTIME
#define VK_CUDA_CHECK(expr)                                   \
  do {                                                        \
    cudaError_t vk_cuda_err_ = (expr);                        \
    if (vk_cuda_err_ != cudaSuccess) {                        \
      (void)cudaGetLastError();                               \
      return vk_status_from_cuda((int)vk_cuda_err_);          \
    }                                                         \
  } while (0)

/* After a <<<...>>> launch: report configuration errors (bad grid, too much shared memory). */
#define VK_CUDA_CHECK_LAUNCH() VK_CUDA_CHECK(cudaGetLastError())
#endif

/* Propagate a non-success vitkern_status. */
#define VK_CHECK(expr)                              \
  do {                                              \
    vitkern_status vk_status_ = (expr);             \
    if (vk_status_ != VK_STATUS_SUCCESS) {          \
      return vk_status_;                            \
    }                                               \
  } while (0)

/* ------------------------------------------------------------------------------------------ */
/* strided tensor descriptor                                                                   */
/* ------------------------------------------------------------------------------------------ */
/* A device tensor of up to 4 dims, e.g. (B, heads, N, d). Strides are in ELEMENTS (like
 * torch.Tensor.stride()), may be 0 (broadcast) and are never assumed contiguous. Tensors of
 * lower rank are left-padded with size 1 / stride 0. Passed to kernels by value. */
#define VK_MAX_DIMS 4

typedef struct vitkern_tensor {
  void* data;
  int64_t sizes[VK_MAX_DIMS];
  int64_t strides[VK_MAX_DIMS];
  int32_t dtype; /* vitkern_dtype */
} vitkern_tensor;

/* Element offset of index (i0, i1, i2, i3); int64 throughout (B*heads*N*d passes 2^31). */
VK_HOST_DEVICE VK_INLINE int64_t vk_offset4(const vitkern_tensor* t, int64_t i0, int64_t i1,
                                            int64_t i2, int64_t i3) {
  return i0 * t->strides[0] + i1 * t->strides[1] + i2 * t->strides[2] + i3 * t->strides[3];
}

VK_HOST_DEVICE VK_INLINE int64_t vk_numel(const vitkern_tensor* t) {
  int64_t n = 1;
  for (int i = 0; i < VK_MAX_DIMS; ++i) n *= t->sizes[i];
  return n;
}

/* 1 if the layout is row-major contiguous (size-1 dims may have any stride). */
VK_HOST_DEVICE VK_INLINE int vk_is_contiguous(const vitkern_tensor* t) {
  int64_t expected = 1;
  for (int i = VK_MAX_DIMS - 1; i >= 0; --i) {
    if (t->sizes[i] != 1 && t->strides[i] != expected) return 0;
    expected *= t->sizes[i];
  }
  return 1;
}

/* Ceil division for non-negative a and positive b. */
VK_HOST_DEVICE VK_INLINE int64_t vk_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Basic validity check of a descriptor against an expected dtype (-1: any). */
VK_INLINE vitkern_status vk_check_tensor(const vitkern_tensor* t, int32_t expected_dtype) {
  if (t == NULL) return VK_STATUS_INVALID_ARGUMENT;
  if (vk_dtype_size(t->dtype) == 0) return VK_STATUS_UNSUPPORTED_DTYPE;
  if (expected_dtype >= 0 && t->dtype != expected_dtype) return VK_STATUS_UNSUPPORTED_DTYPE;
  for (int i = 0; i < VK_MAX_DIMS; ++i) {
    if (t->sizes[i] < 0) return VK_STATUS_INVALID_ARGUMENT;
  }
  if (t->data == NULL && vk_numel(t) > 0) return VK_STATUS_INVALID_ARGUMENT;
  return VK_STATUS_SUCCESS;
}

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* VITKERN_COMMON_H_ */
