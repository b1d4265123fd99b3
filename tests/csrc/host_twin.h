// Glue shared by the CPU builds of the kernels' per-thread programs (hilo_host.cpp,
// window_host.cpp): the block's shared memory as a host buffer, and the entry-point guard that
// turns a failed alignment check of the per-thread code into a status.
#ifndef VITKERN_TESTS_CSRC_HOST_TWIN_H_
#define VITKERN_TESTS_CSRC_HOST_TWIN_H_

#include <stdlib.h>
#include <string.h>

#include "common/args.h"
#include "common/numeric.h"

#if !VK_ALIGN_CHECKS
#error "the CPU test builds run with the alignment checks of csrc/common/numeric.h"
#endif

namespace vk_host {

// Run a launch of the CPU build. A failed alignment check (vk::MisalignedAccess, thrown by the
// host build of the per-thread code where the GPU would fault with cudaErrorMisalignedAddress)
// returns VK_STATUS_MISALIGNED with its message in `why`, instead of unwinding into ctypes.
template <class Launch>
int guarded(char* why, size_t n, Launch&& launch) {
  try {
    return launch();
  } catch (const vk::MisalignedAccess& e) {
    return vk::fail(why, n, VK_STATUS_MISALIGNED, e.what());
  }
}

// A block's dynamic shared memory: `bytes` at a base aligned like the kernel's declaration (16
// for `extern __shared__ uint4`, 128 for `__align__(128)`), so that an address check of the host
// build sees what the GPU sees. Filled with 0xff (NaN patterns): every read must be of a value
// written before.
struct SharedMemory {
  unsigned char* ptr;
  size_t bytes;
  SharedMemory(int64_t size, size_t align)
      : bytes((size_t)vk::align_up(size > 0 ? size : 1, (int64_t)align)) {
    ptr = static_cast<unsigned char*>(aligned_alloc(align, bytes));
    poison();
  }
  ~SharedMemory() { free(ptr); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  void poison() { memset(ptr, 0xff, bytes); }
};

}  // namespace vk_host

#endif  // VITKERN_TESTS_CSRC_HOST_TWIN_H_
