#include "checkpoint/npy.h"

#include <fstream>

namespace nextron {

namespace {
void write_npy_bytes(const std::string& path, const char* descr, const void* data, size_t bytes, const Shape& shape) {
  std::string dims;
  for (size_t i = 0; i < shape.size(); ++i)
    dims += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  // magic (6) + version (2) + header length (2) + header, padded with spaces and a newline to 64 bytes.
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  NEXTRON_CHECK(f.good(), "cannot write '", path, "'");
  f.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  NEXTRON_CHECK(f.good(), "writing '", path, "' failed (disk full?)");
}
}  // namespace

void write_npy(const std::string& path, const float* data, const Shape& shape) {
  write_npy_bytes(path, "<f4", data, static_cast<size_t>(shape_numel(shape)) * 4, shape);
}

void write_npy(const std::string& path, const int64_t* data, const Shape& shape) {
  write_npy_bytes(path, "<i8", data, static_cast<size_t>(shape_numel(shape)) * 8, shape);
}

}  // namespace nextron
