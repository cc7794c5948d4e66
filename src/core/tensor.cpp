#include "core/tensor.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace nextron {

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

namespace {
DeviceMemoryHooks g_hooks;
int64_t g_device_allocations = 0;
std::atomic<int64_t> g_live_bytes[2];  // host, device
std::atomic<int64_t>& live_bytes(Device device) { return g_live_bytes[device == Device::cuda ? 1 : 0]; }
std::atomic<int64_t> g_peak_bytes[2];
void grow(Device device, int64_t bytes) {
  const int64_t now = (live_bytes(device) += bytes);
  std::atomic<int64_t>& peak = g_peak_bytes[device == Device::cuda ? 1 : 0];
  int64_t seen = peak.load();
  while (now > seen && !peak.compare_exchange_weak(seen, now)) {
  }
}
}  // namespace

int64_t live_tensor_bytes(Device device) { return live_bytes(device).load(); }
int64_t peak_tensor_bytes(Device device) { return g_peak_bytes[device == Device::cuda ? 1 : 0].load(); }
void reset_peak_tensor_bytes(Device device) {
  g_peak_bytes[device == Device::cuda ? 1 : 0] = live_bytes(device).load();
}

void register_device_memory_hooks(const DeviceMemoryHooks& hooks) { g_hooks = hooks; }

const DeviceMemoryHooks& device_memory_hooks() {
  NEXTRON_CHECK(g_hooks.alloc != nullptr,
                "CUDA memory requested but the CUDA backend is not initialised: build with nvcc and select "
                "--device cuda (which initialises it)");
  return g_hooks;
}

int64_t device_allocation_count() { return g_device_allocations; }

Storage::Storage(size_t bytes, Device device) : bytes_(bytes), device_(device) {
  if (device == Device::cuda) {
    data_ = device_memory_hooks().alloc(bytes == 0 ? 64 : bytes);
    ++g_device_allocations;
    grow(device, static_cast<int64_t>(bytes));
    return;
  }
  size_t padded = ((bytes + 63) / 64) * 64;
  data_ = std::aligned_alloc(64, padded == 0 ? 64 : padded);
  NEXTRON_CHECK(data_ != nullptr, "out of host memory allocating ", bytes, " bytes");
  std::memset(data_, 0, padded == 0 ? 64 : padded);
  grow(device, static_cast<int64_t>(bytes));
}

Storage::~Storage() {
  live_bytes(device_) -= static_cast<int64_t>(bytes_);
  if (device_ == Device::cuda)
    g_hooks.free(data_);
  else
    std::free(data_);
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  for (int64_t d : shape) NEXTRON_CHECK(d >= 0, "negative dimension in shape ", shape_str(shape));
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::view_of(const Tensor& base, int64_t offset_elems, const Shape& shape) {
  NEXTRON_ASSERT(base.defined());
  size_t end = static_cast<size_t>(base.offset_ + offset_elems + shape_numel(shape)) * dtype_size(base.dtype_);
  NEXTRON_ASSERT(end <= base.storage_->bytes());
  Tensor t;
  t.storage_ = base.storage_;
  t.offset_ = base.offset_ + offset_elems;
  t.shape_ = shape;
  t.dtype_ = base.dtype_;
  return t;
}

void* Tensor::raw() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_ * static_cast<int64_t>(dtype_size(dtype_));
}

float* Tensor::f32() const {
  NEXTRON_ASSERT(dtype_ == DType::f32);
  return data<float>();
}

Tensor Tensor::reshape(const Shape& shape) const {
  NEXTRON_CHECK(shape_numel(shape) == numel(), "cannot reshape ", shape_str(shape_), " to ", shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  NEXTRON_ASSERT(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0]);
  Shape s = shape_;
  s[0] = end - begin;
  return view_of(*this, begin * (numel() / (shape_[0] ? shape_[0] : 1)), s);
}

void Tensor::zero_() {
  if (!defined()) return;
  if (device() == Device::cuda)
    device_memory_hooks().memset_zero(raw(), nbytes());
  else
    std::memset(raw(), 0, nbytes());
}

void Tensor::copy_elements_from(int64_t offset, const Tensor& src, int64_t src_offset, int64_t n) {
  Tensor dst = view_of(*this, offset, {n});
  dst.copy_from(view_of(src, src_offset, {n}));
}

void Tensor::copy_from(const Tensor& src) {
  NEXTRON_CHECK(src.numel() == numel() && src.dtype() == dtype(), "copy_from: size or dtype mismatch ",
                shape_str(src.shape()), " -> ", shape_str(shape_));
  if (device() == Device::cuda || src.device() == Device::cuda)
    device_memory_hooks().copy(raw(), src.raw(), nbytes());
  else
    std::memcpy(raw(), src.raw(), nbytes());
}

}  // namespace nextron
