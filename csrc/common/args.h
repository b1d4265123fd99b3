/* Host-side argument checks shared by the kernels' make_params (the *_core.h headers): the C ABI's
 * error reporting, the descriptor checks and the stride rules for 16-byte vector access. Host
 * C++ only, used by the CUDA launchers and by the CPU test builds alike. */
#ifndef VITKERN_COMMON_ARGS_H_
#define VITKERN_COMMON_ARGS_H_

#include <stdint.h>
#include <stdio.h>

#include "common.h"

namespace vk {

/* Write `msg` into the caller's reason buffer and return `st`. */
inline vitkern_status fail(char* why, size_t n, vitkern_status st, const char* msg) {
  if (why != NULL && n > 0) snprintf(why, n, "%s", msg);
  return st;
}

/* Every descriptor t[0..count) is non-null, valid, and of t[0]'s dtype. */
inline vitkern_status check_descriptors(const vitkern_tensor* const* t, int count, char* why,
                                        size_t n) {
  for (int i = 0; i < count; ++i) {
    if (t[i] == NULL) return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "null tensor descriptor");
    const vitkern_status st = vk_check_tensor(t[i], t[0]->dtype);
    if (st != VK_STATUS_SUCCESS) {
      return fail(why, n, st, "bad tensor descriptor (dtype, size or null data)");
    }
  }
  return VK_STATUS_SUCCESS;
}

/* A size-1 dim's stride is never used: 0, so that it cannot spoil vector alignment. */
inline int64_t eff_stride(const vitkern_tensor* t, int dim) {
  return t->sizes[dim] == 1 ? 0 : t->strides[dim];
}

/* Whether a (B, heads, N, d) tensor allows 16-byte access of `vec`-element channel chunks: an
 * aligned base, unit channel stride and outer strides that keep every chunk aligned. */
inline bool vector_ok(const vitkern_tensor* t, int64_t vec) {
  if (((uintptr_t)t->data) % 16 != 0) return false;
  if (t->sizes[3] > 1 && t->strides[3] != 1) return false;
  for (int i = 0; i < 3; ++i) {
    if (eff_stride(t, i) % vec != 0) return false;
  }
  return true;
}

}  // namespace vk

#endif /* VITKERN_COMMON_ARGS_H_ */
