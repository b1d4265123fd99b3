// pybind11 bindings of vitkern._C: a thin layer from Python ints (tensor.data_ptr(), sizes,
// strides, dtype codes, stream handles) to the torch-free C ABI of csrc/. No torch headers: the
// module works with any torch version and imports on machines without a GPU, a driver or the
// CUDA toolkit (the CUDA runtime is linked statically, see CMakeLists.txt).
//
// Conventions for kernel entries (fill_f32 is the template):
//   - pointers and streams are Python ints; stream 0 is the legacy default stream;
//   - `device` is the CUDA device index that owns the pointers; -1 = ask the driver from the
//     first pointer. The entry switches to that device for the launch and switches back;
//   - the GIL is released around the launch;
//   - the return value is a vitkern_status (0 = success; see status_string()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "common/fill.h"
#include "hilo/hifi.h"
#include "hilo/lofi.h"
#include "window/window.h"

#ifndef VITKERN_VERSION
#define VITKERN_VERSION "0.0.0+unknown"
#endif
#ifndef VITKERN_COMPILED_ARCHS
#define VITKERN_COMPILED_ARCHS ""  // space-separated, e.g. "80 90" (from VITKERN_CUDA_ARCHS)
#endif

namespace py = pybind11;

namespace {

std::vector<int> compiled_archs() {
  std::vector<int> out;
  std::istringstream in(VITKERN_COMPILED_ARCHS);
  int arch = 0;
  while (in >> arch) out.push_back(arch);
  return out;
}

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

// 0 when no driver is installed (libcuda.so.1 cannot be loaded).
int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

// (device count, vitkern_status of the query). Never throws: no driver, a driver older than the
// runtime, or no GPU all give count 0 with the CUDA error encoded in the status.
std::tuple<int, int> probe_devices() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return {0, vk_status_from_cuda(static_cast<int>(err))};
  }
  return {n, VK_STATUS_SUCCESS};
}

int device_count() { return std::get<0>(probe_devices()); }

// (major, minor) compute capability of `device`; (0, 0) if it cannot be queried.
std::tuple<int, int> device_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return {0, 0};
  }
  return {major, minor};
}

std::string status_string(int code) {
  std::string msg = vitkern_status_string(code);
  if (vk_status_is_cuda(code)) {
    const int err = code - VK_STATUS_CUDA_ERROR_BASE;
    const char* name = cudaGetErrorName(static_cast<cudaError_t>(err));
    return "CUDA error " + std::to_string(err) + " (" + (name ? name : "?") + "): " + msg;
  }
  return msg;
}

// Makes `device` current for the lifetime of the guard (and restores the previous one). With
// device = -1 the owner of `ptr` is asked from the driver (unified addressing).
class DeviceGuard {
 public:
  DeviceGuard(int device, const void* ptr) {
    if (device < 0 && ptr != nullptr) {
      cudaPointerAttributes attr{};
      if (cudaPointerGetAttributes(&attr, ptr) == cudaSuccess && attr.type != cudaMemoryTypeUnregistered) {
        device = attr.device;
      } else {
        (void)cudaGetLastError();
      }
    }
    if (device < 0) return;
    if (cudaGetDevice(&prev_) != cudaSuccess) {
      status_ = vk_status_from_cuda(static_cast<int>(cudaGetLastError()));
      return;
    }
    if (prev_ != device) {
      cudaError_t err = cudaSetDevice(device);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();
        status_ = vk_status_from_cuda(static_cast<int>(err));
        return;
      }
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  vitkern_status status() const { return status_; }

 private:
  int prev_ = -1;
  bool switched_ = false;
  vitkern_status status_ = VK_STATUS_SUCCESS;
};

template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

int fill_f32(std::uintptr_t ptr, std::int64_t n, float value, std::uintptr_t stream, int device) {
  if (n == 0) return VK_STATUS_SUCCESS;
  DeviceGuard guard(device, as_ptr<void>(ptr));
  VK_CHECK(guard.status());
  return vitkern_fill_f32(as_ptr<float>(ptr), n, value, as_stream(stream));
}

// A tensor crosses the boundary as (data_ptr, sizes, strides, dtype code); sizes / strides of
// rank < 4 are left-padded with size 1 / stride 0 (common.h's descriptor convention).
bool to_tensor(const py::tuple& t, vitkern_tensor* out) {
  if (t.size() != 4) return false;
  const auto sizes = t[1].cast<std::vector<std::int64_t>>();
  const auto strides = t[2].cast<std::vector<std::int64_t>>();
  if (sizes.size() != strides.size() || sizes.size() > VK_MAX_DIMS) return false;
  out->data = as_ptr<void>(t[0].cast<std::uintptr_t>());
  const size_t pad = VK_MAX_DIMS - sizes.size();
  for (size_t i = 0; i < VK_MAX_DIMS; ++i) {
    out->sizes[i] = i < pad ? 1 : sizes[i - pad];
    out->strides[i] = i < pad ? 0 : strides[i - pad];
  }
  out->dtype = t[3].cast<std::int32_t>();
  return true;
}

using StatusWhy = std::tuple<int, std::string>;

StatusWhy bad_descriptor() {
  return {VK_STATUS_INVALID_ARGUMENT, "tensor descriptors are (data_ptr, sizes, strides, dtype) with rank <= 4"};
}

StatusWhy hifi_supported(int dtype, std::int64_t head_dim, std::int64_t window_size, bool backward) {
  char why[256] = {0};
  const int st = vitkern_hifi_supported(dtype, head_dim, window_size, backward ? 1 : 0, why, sizeof why);
  return {st, why};
}

// Convert the descriptors, then run `launch(t, why, why_len)` on `device` with the GIL released
// (the kernels are asynchronous: nothing here waits for the GPU).
template <size_t N, class Launch>
StatusWhy launch_on(const std::array<const py::tuple*, N>& in, int device, Launch&& launch) {
  vitkern_tensor t[N];
  for (size_t i = 0; i < N; ++i) {
    if (!to_tensor(*in[i], &t[i])) return bad_descriptor();
  }
  char why[256] = {0};
  int st;
  {
    py::gil_scoped_release release;
    DeviceGuard guard(device, t[0].data);
    st = guard.status();
    if (st == VK_STATUS_SUCCESS) st = launch(t, why, sizeof why);
  }
  return {st, why};
}

StatusWhy hifi_fwd(const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& o,
                   std::int64_t H, std::int64_t W, std::int64_t window_size, float scale,
                   std::uintptr_t stream, int device) {
  return launch_on<4>({&q, &k, &v, &o}, device, [&](vitkern_tensor* t, char* why, size_t n) {
    return vitkern_hifi_fwd(&t[0], &t[1], &t[2], &t[3], H, W, window_size, scale,
                            as_stream(stream), why, n);
  });
}

StatusWhy hifi_bwd(const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& dout,
                   const py::tuple& dq, const py::tuple& dk, const py::tuple& dv, std::int64_t H,
                   std::int64_t W, std::int64_t window_size, float scale, std::uintptr_t stream,
                   int device) {
  return launch_on<7>({&q, &k, &v, &dout, &dq, &dk, &dv}, device,
                      [&](vitkern_tensor* t, char* why, size_t n) {
    return vitkern_hifi_bwd(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], H, W, window_size,
                            scale, as_stream(stream), why, n);
  });
}

StatusWhy lofi_supported(int dtype, std::int64_t head_dim, std::int64_t pool) {
  char why[256] = {0};
  const int st = vitkern_lofi_supported(dtype, head_dim, pool, why, sizeof why);
  return {st, why};
}

StatusWhy lofi_fwd(const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& o,
                   std::int64_t H, std::int64_t W, std::int64_t window_size, bool kv_pooled,
                   float scale, std::uintptr_t stream, int device) {
  return launch_on<4>({&q, &k, &v, &o}, device, [&](vitkern_tensor* t, char* why, size_t n) {
    return vitkern_lofi_fwd(&t[0], &t[1], &t[2], &t[3], H, W, window_size, kv_pooled ? 1 : 0,
                            scale, as_stream(stream), why, n);
  });
}

StatusWhy window_supported(int dtype, std::int64_t head_dim, std::int64_t window_size) {
  char why[256] = {0};
  const int st = vitkern_window_supported(dtype, head_dim, window_size, why, sizeof why);
  return {st, why};
}

StatusWhy window_fwd(const py::tuple& q, const py::tuple& k, const py::tuple& v, const py::tuple& o,
                     const py::object& bias, std::int64_t H, std::int64_t W,
                     std::int64_t window_size, std::int64_t shift, int pad_order, float mask_value,
                     float scale, std::uintptr_t stream, int device) {
  vitkern_tensor b;
  const bool has_bias = !bias.is_none();
  if (has_bias && !to_tensor(bias.cast<py::tuple>(), &b)) return bad_descriptor();
  return launch_on<4>({&q, &k, &v, &o}, device, [&](vitkern_tensor* t, char* why, size_t n) {
    return vitkern_window_fwd(&t[0], &t[1], &t[2], &t[3], has_bias ? &b : nullptr, H, W,
                              window_size, shift, pad_order, mask_value, scale, as_stream(stream),
                              why, n);
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitkern CUDA C++ kernels behind a torch-free C ABI (raw pointers, strides, streams)";

  m.def("version", []() { return std::string(VITKERN_VERSION); },
        "vitkern version this extension was built from.");
  m.def("compiled_archs", &compiled_archs,
        "CUDA architectures compiled into the module, e.g. [80, 90].");
  m.def("cuda_runtime_version", &runtime_version,
        "Version of the statically linked CUDA runtime (e.g. 13000 for 13.0).");
  m.def("driver_version", &driver_version,
        "CUDA version supported by the installed driver (e.g. 13000); 0 without a driver.");
  m.def("device_count", &device_count,
        "Number of visible CUDA devices; 0 (never an exception) without a driver or GPU.");
  m.def("probe_devices", &probe_devices,
        "(device_count, status): status explains a count of 0 (see status_string).");
  m.def("device_capability", &device_capability, py::arg("device") = 0,
        "(major, minor) compute capability of a device; (0, 0) if unavailable.");
  m.def("status_string", &status_string, py::arg("code"),
        "Human-readable message of a vitkern status code.");

  m.attr("DTYPE_FP32") = static_cast<int>(VK_DTYPE_FP32);
  m.attr("DTYPE_FP16") = static_cast<int>(VK_DTYPE_FP16);
  m.attr("DTYPE_BF16") = static_cast<int>(VK_DTYPE_BF16);
  m.attr("STATUS_SUCCESS") = static_cast<int>(VK_STATUS_SUCCESS);
  m.attr("STATUS_CUDA_ERROR_BASE") = static_cast<int>(VK_STATUS_CUDA_ERROR_BASE);

  m.def("fill_f32", &fill_f32, py::arg("ptr"), py::arg("n"), py::arg("value"),
        py::arg("stream") = 0, py::arg("device") = -1,
        py::call_guard<py::gil_scoped_release>(),
        "ptr[0:n] = value (float32, device memory), asynchronously on `stream`. Returns a status.");

  // HiLo Hi-Fi (csrc/hilo/hifi.h). Tensors: (data_ptr, sizes, strides, dtype code), all
  // (B, heads, H*W, d) of one dtype. Each returns (status, reason); nothing raises.
  m.def("hifi_supported", &hifi_supported, py::arg("dtype"), py::arg("head_dim"),
        py::arg("window_size"), py::arg("backward") = false,
        "(status, reason): whether the Hi-Fi kernels take this dtype / head_dim / window_size.");
  m.def("hifi_fwd", &hifi_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
        py::arg("H"), py::arg("W"), py::arg("window_size"), py::arg("scale"),
        py::arg("stream") = 0, py::arg("device") = -1,
        "Hi-Fi forward into o, asynchronously on `stream`. Returns (status, reason).");
  m.def("hifi_bwd", &hifi_bwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("H"), py::arg("W"),
        py::arg("window_size"), py::arg("scale"), py::arg("stream") = 0, py::arg("device") = -1,
        "Hi-Fi backward into dq, dk, dv (scores recomputed). Returns (status, reason).");

  // HiLo Lo-Fi forward (csrc/hilo/lofi.h): k, v full-resolution (pooled in the kernel) or pooled.
  m.def("lofi_supported", &lofi_supported, py::arg("dtype"), py::arg("head_dim"), py::arg("pool"),
        "(status, reason): whether the Lo-Fi kernel takes this dtype / head_dim / pooling factor.");
  m.def("lofi_fwd", &lofi_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("H"),
        py::arg("W"), py::arg("window_size"), py::arg("kv_pooled"), py::arg("scale"),
        py::arg("stream") = 0, py::arg("device") = -1,
        "Lo-Fi forward into o, asynchronously on `stream`. Returns (status, reason).");

  // Swin window attention forward (csrc/window/window.h): ws 7 / 12, d 32, fp16 / bf16.
  m.def("window_supported", &window_supported, py::arg("dtype"), py::arg("head_dim"),
        py::arg("window_size"),
        "(status, reason): whether the window kernel takes this dtype / head_dim / window.");
  m.def("window_fwd", &window_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
        py::arg("bias"), py::arg("H"), py::arg("W"), py::arg("window_size"), py::arg("shift"),
        py::arg("pad_order"), py::arg("mask_value"), py::arg("scale"), py::arg("stream") = 0,
        py::arg("device") = -1,
        "Window attention forward into o (bias: None or a float32 descriptor). (status, reason).");
}
