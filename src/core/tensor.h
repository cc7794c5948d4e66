// Tensor: a typed, shaped, contiguous view into a storage buffer (owned or borrowed).
// Parameters, gradients and optimizer state live in flat buffers; a module's tensors are views into them,
// so a ZeRO shard or a checkpoint write is a slice of one buffer.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace nextron {

enum class Device { cpu, cuda };

using Shape = std::vector<int64_t>;

int64_t shape_numel(const Shape& s);

// Elements [begin, end) of a flat buffer (the parameter layout's ranges: ZeRO shards, reduction groups).
struct FlatRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
};
std::string shape_str(const Shape& s);

// Device memory management, registered by the CUDA backend (src/core/cuda) so that this core library does not
// depend on CUDA. copy handles every direction (host/device, device/device).
struct DeviceMemoryHooks {
  void* (*alloc)(size_t bytes) = nullptr;  // zero-filled
  void (*free)(void* ptr) = nullptr;
  void (*memset_zero)(void* ptr, size_t bytes) = nullptr;
  void (*copy)(void* dst, const void* src, size_t bytes) = nullptr;
};
void register_device_memory_hooks(const DeviceMemoryHooks& hooks);
const DeviceMemoryHooks& device_memory_hooks();  // throws when no CUDA backend is linked in / initialised
// Device allocations made so far (the CUDA backend's steady state must not add any: tests/cuda checks it).
int64_t device_allocation_count();
// Bytes of Tensor storage alive now on `device` (every Storage counts its requested size from construction to
// destruction): activation memory is measured as its growth (tests/unit/test_activation_memory.cpp).
int64_t live_tensor_bytes(Device device);
// The most live_tensor_bytes(device) reached since the start or the last reset (which sets it to the bytes live now).
int64_t peak_tensor_bytes(Device device);
void reset_peak_tensor_bytes(Device device);

// A block of memory, zero-initialised; CPU storage is 64-byte aligned.
class Storage {
 public:
  Storage(size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
};

class Tensor {
 public:
  Tensor() = default;
  // A new zero-filled tensor with its own storage.
  static Tensor zeros(const Shape& shape, DType dtype = DType::f32, Device device = Device::cpu);
  // A view of `shape` starting `offset_elems` elements into `base`'s storage (dtypes must match).
  static Tensor view_of(const Tensor& base, int64_t offset_elems, const Shape& shape);

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu; }
  bool defined() const { return storage_ != nullptr; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const;
  template <typename T>
  T* data() const {
    return static_cast<T*>(raw());
  }
  float* f32() const;  // checked accessor for the common case

  // Same storage, new shape with the same element count.
  Tensor reshape(const Shape& shape) const;
  // Rows [begin, end) of dim 0.
  Tensor slice0(int64_t begin, int64_t end) const;
  void zero_();
  // Copies src's elements (same count and dtype) from any device to any device.
  void copy_from(const Tensor& src);
  // this[offset, +n) = src[src_offset, +n) (flat elements, same dtype; any devices).
  void copy_elements_from(int64_t offset, const Tensor& src, int64_t src_offset, int64_t n);

 private:
  std::shared_ptr<Storage> storage_;
  int64_t offset_ = 0;  // in elements
  Shape shape_;
  DType dtype_ = DType::f32;
};

}  // namespace nextron
