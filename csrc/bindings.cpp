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

#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "common/fill.h"

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
}
