// CPU build of the HiLo CUDA kernels' per-thread programs (csrc/hilo/hifi_core.h and
// csrc/hilo/lofi_core.h), for tests/test_csrc_hilo.py (loaded with ctypes; compiled with the
// host C++ compiler, no CUDA).
//
// It runs a launch exactly as hifi.cu / lofi.cu do -- same make_params(), same grid and block
// geometry, same template specialisations, the same phase functions per thread -- and replaces
// only the GPU glue: each barrier becomes "all threads of the block finish the phase", the
// warp-shuffle sum over a token's lanes becomes the same butterfly over a host array, shared
// memory a host buffer. Every 16-byte vector access and shared-memory region of the per-thread
// code checks its alignment here (csrc/common/numeric.h): a launch that would fault with
// cudaErrorMisalignedAddress on the GPU returns VK_STATUS_MISALIGNED.
#include <vector>

#include "hilo/hifi_core.h"
#include "hilo/lofi_core.h"
#include "host_twin.h"

namespace {

using namespace vk;
using namespace vk::hifi;
using vk_host::guarded;

// kernels' `extern __shared__ uint4`: a 16-byte aligned base
constexpr size_t kSmemBaseAlign = 16;

struct Block {
  std::vector<Thread> th;
  vk_host::SharedMemory mem;
  unsigned char* smem;
  Block(int threads, int64_t smem_bytes)
      : th((size_t)threads), mem(smem_bytes, kSmemBaseAlign), smem(mem.ptr) {}
  explicit Block(const Params& p) : Block(p.block_threads, p.smem_bytes) {}
};

// The shuffle sum: every thread gets the sum of its token's `lanes` partials (the xor butterfly
// of the kernels: after step k, sums over aligned groups of 2^(k+1) lanes).
void lane_sums(int lanes, int threads, std::vector<float>& part, int width) {
  std::vector<float> out(part.size());
  std::vector<float> cur(part);
  for (int off = 1; off < lanes; off <<= 1) {
    for (int t = 0; t < threads; ++t) {
      for (int j = 0; j < width; ++j) {
        out[(size_t)t * width + j] = cur[(size_t)t * width + j] + cur[(size_t)(t ^ off) * width + j];
      }
    }
    cur.swap(out);
  }
  part.swap(cur);
}

template <class T, int S>
void run_fwd(const Params& p) {
  constexpr int NK = S * S;
  Block blk(p);
  const int slots[2] = {kK, kV};
  std::vector<float> sc((size_t)p.block_threads * kMaxNK);
  for (int64_t b = 0; b < p.grid; ++b) {
    for (int t = 0; t < p.block_threads; ++t) {
      blk.th[t] = thread_coords<S>(p, b, t);
      stage<T>(p, blk.th[t], blk.smem, slots, 2);
    }
    // __syncthreads()
    for (int t = 0; t < p.block_threads; ++t) {
      fwd_partial_scores<T, NK>(p, blk.th[t], blk.smem, &sc[(size_t)t * kMaxNK]);
    }
    lane_sums(p.lanes, p.block_threads, sc, kMaxNK);
    for (int t = 0; t < p.block_threads; ++t) {
      fwd_finish<T, NK>(p, blk.th[t], blk.smem, &sc[(size_t)t * kMaxNK]);
    }
  }
}

template <class T, int S>
void run_bwd(const Params& p) {
  constexpr int NK = S * S;
  Block blk(p);
  const int slots[4] = {kQ, kK, kV, kDO};
  std::vector<float> sc((size_t)p.block_threads * kMaxNK), dp(sc.size());
  for (int64_t b = 0; b < p.grid; ++b) {
    for (int t = 0; t < p.block_threads; ++t) {
      blk.th[t] = thread_coords<S>(p, b, t);
      stage<T>(p, blk.th[t], blk.smem, slots, 4);
    }
    // __syncthreads()
    for (int t = 0; t < p.block_threads; ++t) {
      bwd_partial<T, NK>(p, blk.th[t], blk.smem, &sc[(size_t)t * kMaxNK], &dp[(size_t)t * kMaxNK]);
    }
    lane_sums(p.lanes, p.block_threads, sc, kMaxNK);
    lane_sums(p.lanes, p.block_threads, dp, kMaxNK);
    for (int t = 0; t < p.block_threads; ++t) {
      bwd_rows<T, NK>(p, blk.th[t], blk.smem, &sc[(size_t)t * kMaxNK], &dp[(size_t)t * kMaxNK]);
    }
    // __syncthreads()
    for (int t = 0; t < p.block_threads; ++t) bwd_columns<T, NK>(p, blk.th[t], blk.smem);
  }
}

template <class T>
void run_s(const Params& p) {
  switch (p.s) {  // the same specialisations as hifi.cu's launch_s
    case 2: return p.backward ? run_bwd<T, 2>(p) : run_fwd<T, 2>(p);
    case 4: return p.backward ? run_bwd<T, 4>(p) : run_fwd<T, 4>(p);
    default: return p.backward ? run_bwd<T, 0>(p) : run_fwd<T, 0>(p);
  }
}

vitkern_status run(const Params& p) {
  if (p.grid == 0) return VK_STATUS_SUCCESS;
  switch (p.dtype) {
    case VK_DTYPE_FP32: run_s<float>(p); break;
    case VK_DTYPE_FP16: run_s<half_t>(p); break;
    case VK_DTYPE_BF16: run_s<bf16_t>(p); break;
    default: return VK_STATUS_UNSUPPORTED_DTYPE;
  }
  return VK_STATUS_SUCCESS;
}

// ---- Lo-Fi ------------------------------------------------------------------------------
template <class T>
void run_lofi(const lofi::Params& p) {
  using lofi::kKeyChunk;
  const int threads = p.block_threads;
  std::vector<lofi::Thread> th((size_t)threads);
  std::vector<lofi::State> st((size_t)threads);
  std::vector<float> sc((size_t)threads * kKeyChunk);
  Block blk(threads, p.smem_bytes);
  float* smem = reinterpret_cast<float*>(blk.smem);
  const int items = lofi::stage_items(p);
  for (int64_t b = 0; b < p.grid; ++b) {
    for (int t = 0; t < threads; ++t) {
      th[t] = lofi::thread_coords(p, b, t);
      lofi::init_state<T>(p, th[t], st[t]);
    }
    for (int64_t j0 = 0; j0 < p.M; j0 += kKeyChunk) {
      blk.mem.poison();  // a stale chunk must never be read
      for (int t = 0; t < threads; ++t) {
        for (int it = t; it < items; it += threads) lofi::stage_item<T>(p, th[t].b, th[t].h, j0, it, smem);
      }
      // __syncthreads()
      for (int t = 0; t < threads; ++t) lofi::partial_scores(p, th[t], st[t], smem, &sc[(size_t)t * kKeyChunk]);
      lane_sums(p.lanes, threads, sc, kKeyChunk);
      for (int t = 0; t < threads; ++t) lofi::update(p, th[t], st[t], smem, j0, &sc[(size_t)t * kKeyChunk]);
    }
    for (int t = 0; t < threads; ++t) lofi::finish<T>(p, th[t], st[t]);
  }
}

}  // namespace

extern "C" {

int vk_host_lofi_supported(int32_t dtype, int64_t d, int64_t pool, char* why, size_t n) {
  return lofi::supported(dtype, d, pool, why, n);
}

int vk_host_lofi_fwd(const vitkern_tensor* q, const vitkern_tensor* k, const vitkern_tensor* v,
                     const vitkern_tensor* o, int64_t H, int64_t W, int64_t s, int32_t kv_pooled,
                     float scale, char* why, size_t n) {
  lofi::Params p;
  VK_CHECK(lofi::make_params(&p, q, k, v, o, H, W, s, kv_pooled, scale, why, n));
  if (p.grid == 0) return VK_STATUS_SUCCESS;
  return guarded(why, n, [&]() -> int {
    switch (p.dtype) {
      case VK_DTYPE_FP32: run_lofi<float>(p); break;
      case VK_DTYPE_FP16: run_lofi<half_t>(p); break;
      case VK_DTYPE_BF16: run_lofi<bf16_t>(p); break;
      default: return VK_STATUS_UNSUPPORTED_DTYPE;
    }
    return VK_STATUS_SUCCESS;
  });
}

// Lo-Fi launch geometry of a call: lanes, dp (padded row width), qt, block_threads, smem_bytes,
// grid, stage items per chunk, vec_mask (the q slot's bit first).
int vk_host_lofi_geometry(const vitkern_tensor* q, const vitkern_tensor* k,
                          const vitkern_tensor* v, const vitkern_tensor* o, int64_t H, int64_t W,
                          int64_t s, int32_t kv_pooled, int64_t* out, char* why, size_t n) {
  lofi::Params p;
  VK_CHECK(lofi::make_params(&p, q, k, v, o, H, W, s, kv_pooled, 1.0f, why, n));
  const int64_t vals[8] = {p.lanes, p.dp, p.qt, p.block_threads, p.smem_bytes, p.grid,
                           lofi::stage_items(p), (int64_t)p.vec_mask};
  for (int i = 0; i < 8; ++i) out[i] = vals[i];
  return VK_STATUS_SUCCESS;
}

int vk_host_hifi_supported(int32_t dtype, int64_t d, int64_t s, int32_t backward, char* why,
                           size_t n) {
  return supported(dtype, d, s, backward, why, n);
}

int vk_host_hifi_fwd(const vitkern_tensor* q, const vitkern_tensor* k, const vitkern_tensor* v,
                     const vitkern_tensor* o, int64_t H, int64_t W, int64_t s, float scale,
                     char* why, size_t n) {
  const vitkern_tensor* t[4] = {q, k, v, o};
  Params p;
  VK_CHECK(make_params(&p, t, 0, H, W, s, scale, why, n));
  return guarded(why, n, [&] { return run(p); });
}

int vk_host_hifi_bwd(const vitkern_tensor* q, const vitkern_tensor* k, const vitkern_tensor* v,
                     const vitkern_tensor* dout, const vitkern_tensor* dq,
                     const vitkern_tensor* dk, const vitkern_tensor* dv, int64_t H, int64_t W,
                     int64_t s, float scale, char* why, size_t n) {
  const vitkern_tensor* t[7] = {q, k, v, dout, dq, dk, dv};
  Params p;
  VK_CHECK(make_params(&p, t, 1, H, W, s, scale, why, n));
  return guarded(why, n, [&] { return run(p); });
}

// Launch geometry of a call: lanes, nv, win_threads, wpb, block_threads, smem_bytes, grid,
// vec_mask (the q slot's bit first).
int vk_host_hifi_geometry(const vitkern_tensor* q, const vitkern_tensor* k,
                          const vitkern_tensor* v, const vitkern_tensor* o, int64_t H, int64_t W,
                          int64_t s, int32_t backward, int64_t* out, char* why, size_t n) {
  const vitkern_tensor* t[7] = {q, k, v, o, o, o, o};
  Params p;
  VK_CHECK(make_params(&p, t, backward, H, W, s, 1.0f, why, n));
  const int64_t vals[8] = {p.lanes, p.nv, p.win_threads, p.wpb, p.block_threads, p.smem_bytes,
                           p.grid, (int64_t)p.vec_mask};
  for (int i = 0; i < 8; ++i) out[i] = vals[i];
  return VK_STATUS_SUCCESS;
}

void vk_host_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<half_t>(in[i]).bits;
}
void vk_host_to_bf16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<bf16_t>(in[i]).bits;
}
void vk_host_from_half(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(half_t{in[i]});
}
void vk_host_from_bf16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(bf16_t{in[i]});
}
uint32_t vk_host_fastdiv(uint32_t n, uint32_t d) { return fastdiv(n, make_fastdiv(d)); }

// The alignment checks of the vector moves themselves: `op` (0: copy16 store, 1: copy16 load,
// 2: load16_float, 3: zero_chunk, 4: store_chunk_float, 5: gather_chunk) on fp16 data at byte
// `offset` of a 64-byte aligned buffer (the other operand aligned). VK_STATUS_MISALIGNED and the
// message when the check fires.
int vk_host_vector_probe(int32_t op, int64_t offset, char* why, size_t n) {
  if (op < 0 || op > 5 || offset < 0 || offset > 32 || offset % 2 != 0) {
    return fail(why, n, VK_STATUS_INVALID_ARGUMENT, "op in [0, 5], even offset in [0, 32]");
  }
  vk_host::SharedMemory mem(128, 64);
  half_t* at = reinterpret_cast<half_t*>(mem.ptr + offset);
  half_t* aligned = reinterpret_cast<half_t*>(mem.ptr + 64);
  return guarded(why, n, [&] {
    float x[8] = {0.0f};
    switch (op) {
      case 0: copy16(at, aligned); break;
      case 1: copy16(aligned, at); break;
      case 2: load16_float(at, x); break;
      case 3: zero_chunk(at); break;
      case 4: store_chunk_float(at, 1, true, x); break;
      default: gather_chunk(aligned, at, 1, true); break;
    }
    return (int)VK_STATUS_SUCCESS;
  });
}

}  // extern "C"
