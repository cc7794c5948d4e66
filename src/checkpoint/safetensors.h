// safetensors files: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
// then the raw little-endian tensor bytes. Used for HF checkpoints and our golden fixtures.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace nextron {

struct SafetensorsEntry {
  std::string dtype;  // "F32", "BF16", "F16", "I64", "I32", "F64"
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  std::vector<std::string> names() const;
  // The header's "__metadata__" string map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Reads tensor `name` converted to f32 into dst (numel elements); the stored shape must equal `expect`.
  void read_f32(const std::string& name, float* dst, const Shape& expect) const;
  // Reads elements [first, first + count) of tensor `name` (row-major) converted to f32, reading only their bytes;
  // the stored shape must equal `expect`.
  void read_f32_range(const std::string& name, const Shape& expect, int64_t first, int64_t count, float* dst) const;
  // Reads a whole tensor as f32 (floating dtypes) with its stored shape.
  Tensor read_f32(const std::string& name) const;
  std::vector<int64_t> read_i64(const std::string& name) const;  // I64 or I32 tensors

 private:
  std::vector<char> raw(const SafetensorsEntry& e) const;
  std::vector<char> raw(const SafetensorsEntry& e, uint64_t begin, uint64_t end) const;  // bytes of the entry
  void to_f32(const std::string& name, const SafetensorsEntry& e, const std::vector<char>& buf, float* dst) const;
  std::string path_;
  uint64_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Adds f32 data, stored as "F32" or converted to "BF16".
  void add_f32(const std::string& name, const float* data, const Shape& shape, DType stored = DType::f32);
  void add_i64(const std::string& name, const int64_t* data, const Shape& shape);
  uint64_t data_bytes() const { return bytes_; }
  size_t size() const { return tensors_.size(); }
  // Writes `path` atomically (a temporary file renamed into place), tensors in insertion order.
  void write(const std::string& path, const std::map<std::string, std::string>& metadata = {}) const;

 private:
  struct Item {
    std::string name, dtype;
    Shape shape;
    std::vector<char> bytes;
  };
  std::vector<Item> tensors_;
  uint64_t bytes_ = 0;
};

// Writes one safetensors file tensor by tensor: the header (names, shapes, the stored dtype, offsets) is known up
// front, each tensor's bytes go to the file as they come (one tensor in memory at a time), and finish() renames the
// file into place (a failed write leaves no file under `path`).
class SafetensorsStreamWriter {
 public:
  struct Entry {
    std::string name;
    Shape shape;
  };
  SafetensorsStreamWriter(const std::string& path, std::vector<Entry> entries, DType stored,
                          const std::map<std::string, std::string>& metadata = {});
  void write_next(const float* data);  // the next entry's values, converted to the stored dtype
  void finish();

 private:
  std::string path_, tmp_;
  std::vector<Entry> entries_;
  DType stored_;
  size_t next_ = 0;
  std::ofstream out_;
};

}  // namespace nextron
