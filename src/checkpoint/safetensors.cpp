#include "checkpoint/safetensors.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

namespace nextron {

namespace {
size_t stored_size(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "BF16" || dtype == "F16") return 2;
  if (dtype == "F64" || dtype == "I64") return 8;
  return 0;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      uint32_t m = man;
      do {
        ++e;
        m <<= 1;
      } while ((m & 0x400) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  std::ifstream f(path, std::ios::binary);
  NEXTRON_CHECK(f.good(), "cannot open safetensors file '", path, "'");
  f.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  uint64_t header_len = 0;
  f.read(reinterpret_cast<char*>(&header_len), 8);
  NEXTRON_CHECK(f.good() && file_size >= 8 && header_len <= file_size - 8, "'", path,
                "' is not a safetensors file (bad header length); the file is truncated or corrupt");
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  NEXTRON_CHECK(f.good(), "'", path, "': cannot read its safetensors header; the file is truncated or corrupt");
  data_start_ = 8 + header_len;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(header);
  } catch (const nlohmann::json::exception& e) {
    NEXTRON_CHECK(false, "'", path, "' has a corrupt safetensors header: ", e.what());
  }
  NEXTRON_CHECK(j.is_object(), "'", path, "' has a corrupt safetensors header (not an object)");
  const uint64_t data_size = file_size - data_start_;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      NEXTRON_CHECK(it->is_object(), "'", path, "': __metadata__ must be a string map");
      for (auto m = it->begin(); m != it->end(); ++m)
        if (m->is_string()) metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    try {
      SafetensorsEntry e;
      e.dtype = it->at("dtype").get<std::string>();
      e.shape = it->at("shape").get<Shape>();
      auto off = it->at("data_offsets").get<std::vector<uint64_t>>();
      NEXTRON_CHECK(off.size() == 2, "bad data_offsets");
      e.begin = off[0];
      e.end = off[1];
      const size_t es = stored_size(e.dtype);
      NEXTRON_CHECK(es != 0, "'", path, "': tensor '", it.key(), "' has unsupported dtype ", e.dtype);
      // The element count is bounded by the data section before it is multiplied out, so a damaged shape can
      // neither overflow nor make a reader allocate more than the file holds.
      uint64_t numel = 1;
      for (const int64_t d : e.shape) {
        NEXTRON_CHECK(d >= 0 && (d == 0 || numel <= data_size / es / static_cast<uint64_t>(d)), "'", path,
                      "': tensor '", it.key(), "' has shape ", shape_str(e.shape),
                      ", larger than the file; the file is truncated or corrupt");
        numel *= static_cast<uint64_t>(d);
      }
      NEXTRON_CHECK(e.begin <= e.end && e.end <= data_size && e.end - e.begin == numel * es, "'", path, "': tensor '",
                    it.key(), "' has data offsets outside the file or a size that ",
                    "does not match its shape; the file is truncated or corrupt");
      entries_[it.key()] = e;
    } catch (const nlohmann::json::exception& ex) {
      NEXTRON_CHECK(false, "'", path, "': malformed header entry '", it.key(), "': ", ex.what());
    }
  }
}

const SafetensorsEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  NEXTRON_CHECK(it != entries_.end(), "'", path_, "' has no tensor named '", name, "'");
  return it->second;
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : entries_) n.push_back(k);
  return n;
}

std::vector<char> SafetensorsReader::raw(const SafetensorsEntry& e) const { return raw(e, 0, e.end - e.begin); }

std::vector<char> SafetensorsReader::raw(const SafetensorsEntry& e, uint64_t begin, uint64_t end) const {
  NEXTRON_ASSERT(begin <= end && end <= e.end - e.begin);
  std::ifstream f(path_, std::ios::binary);
  NEXTRON_CHECK(f.good(), "cannot open safetensors file '", path_, "'");
  std::vector<char> buf(end - begin);
  f.seekg(static_cast<std::streamoff>(data_start_ + e.begin + begin));
  f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  NEXTRON_CHECK(f.good() || buf.empty(), "'", path_, "': short read; the file is truncated");
  return buf;
}

void SafetensorsReader::read_f32(const std::string& name, float* dst, const Shape& expect) const {
  read_f32_range(name, expect, 0, shape_numel(expect), dst);
}

void SafetensorsReader::read_f32_range(const std::string& name, const Shape& expect, int64_t first, int64_t count,
                                       float* dst) const {
  const SafetensorsEntry& e = entry(name);
  NEXTRON_CHECK(e.shape == expect, "'", path_, "': tensor '", name, "' has shape ", shape_str(e.shape),
                " but the model expects ", shape_str(expect), "; the checkpoint does not match config.json");
  NEXTRON_ASSERT(first >= 0 && count >= 0 && first + count <= shape_numel(e.shape));
  const uint64_t size = e.dtype == "F32" ? 4 : e.dtype == "F64" ? 8 : 2;
  to_f32(name, e, raw(e, first * size, (first + count) * size), dst);
}

void SafetensorsReader::to_f32(const std::string& name, const SafetensorsEntry& e, const std::vector<char>& buf,
                               float* dst) const {
  if (e.dtype == "F32") {
    std::memcpy(dst, buf.data(), buf.size());
  } else if (e.dtype == "BF16" || e.dtype == "F16") {
    const bool bf = e.dtype == "BF16";
    for (size_t i = 0; i < buf.size() / 2; ++i) {
      uint16_t h;
      std::memcpy(&h, buf.data() + 2 * i, 2);
      dst[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
    }
  } else if (e.dtype == "F64") {
    for (size_t i = 0; i < buf.size() / 8; ++i) {
      double d;
      std::memcpy(&d, buf.data() + 8 * i, 8);
      dst[i] = static_cast<float>(d);
    }
  } else {
    NEXTRON_CHECK(false, "'", path_, "': tensor '", name, "' is ", e.dtype, ", expected a floating dtype");
  }
}

Tensor SafetensorsReader::read_f32(const std::string& name) const {
  Tensor t = Tensor::zeros(entry(name).shape);
  read_f32(name, t.f32(), t.shape());
  return t;
}

std::vector<int64_t> SafetensorsReader::read_i64(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  const std::vector<char> buf = raw(e);
  const int64_t n = shape_numel(e.shape);
  std::vector<int64_t> out(n);
  if (e.dtype == "I64") {
    std::memcpy(out.data(), buf.data(), buf.size());
  } else if (e.dtype == "I32") {
    for (int64_t i = 0; i < n; ++i) {
      int32_t v;
      std::memcpy(&v, buf.data() + 4 * i, 4);
      out[i] = v;
    }
  } else {
    NEXTRON_CHECK(false, "'", path_, "': tensor '", name, "' is ", e.dtype, ", expected an integer dtype");
  }
  return out;
}

void SafetensorsWriter::add_f32(const std::string& name, const float* data, const Shape& shape, DType stored) {
  Item it{name, "", shape, {}};
  const int64_t n = shape_numel(shape);
  if (stored == DType::f32) {
    it.dtype = "F32";
    it.bytes.resize(4 * n);
    std::memcpy(it.bytes.data(), data, 4 * n);
  } else {
    NEXTRON_CHECK(stored == DType::bf16, "safetensors writer: only f32 and bf16 storage are supported");
    it.dtype = "BF16";
    it.bytes.resize(2 * n);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t h = f32_to_bf16(data[i]);
      std::memcpy(it.bytes.data() + 2 * i, &h, 2);
    }
  }
  bytes_ += it.bytes.size();
  tensors_.push_back(std::move(it));
}

void SafetensorsWriter::add_i64(const std::string& name, const int64_t* data, const Shape& shape) {
  Item it{name, "I64", shape, {}};
  it.bytes.resize(8 * shape_numel(shape));
  std::memcpy(it.bytes.data(), data, it.bytes.size());
  bytes_ += it.bytes.size();
  tensors_.push_back(std::move(it));
}

void SafetensorsWriter::write(const std::string& path, const std::map<std::string, std::string>& metadata) const {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& t : tensors_) {
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.bytes.size()}}};
    off += t.bytes.size();
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // the data section starts 8-byte aligned, as safetensors does
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    NEXTRON_CHECK(f.good(), "cannot write '", tmp, "' (check the directory exists and is writable)");
    const uint64_t n = h.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& t : tensors_) f.write(t.bytes.data(), static_cast<std::streamsize>(t.bytes.size()));
    f.flush();
    NEXTRON_CHECK(f.good(), "writing '", tmp, "' failed (disk full?)");
  }
  std::filesystem::rename(tmp, path);
}

SafetensorsStreamWriter::SafetensorsStreamWriter(const std::string& path, std::vector<Entry> entries, DType stored,
                                                 const std::map<std::string, std::string>& metadata)
    : path_(path), tmp_(path + ".tmp"), entries_(std::move(entries)), stored_(stored) {
  NEXTRON_CHECK(stored == DType::f32 || stored == DType::bf16,
                "safetensors writer: only f32 and bf16 storage are supported");
  const uint64_t elem = stored == DType::f32 ? 4 : 2;
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const Entry& e : entries_) {
    const uint64_t bytes = static_cast<uint64_t>(shape_numel(e.shape)) * elem;
    header[e.name] = {
        {"dtype", stored == DType::f32 ? "F32" : "BF16"}, {"shape", e.shape}, {"data_offsets", {off, off + bytes}}};
    off += bytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // the data section starts 8-byte aligned, as safetensors does
  out_.open(tmp_, std::ios::binary | std::ios::trunc);
  NEXTRON_CHECK(out_.good(), "cannot write '", tmp_, "' (check the directory exists and is writable)");
  const uint64_t n = h.size();
  out_.write(reinterpret_cast<const char*>(&n), 8);
  out_.write(h.data(), static_cast<std::streamsize>(h.size()));
}

void SafetensorsStreamWriter::write_next(const float* data) {
  NEXTRON_ASSERT(next_ < entries_.size());
  const int64_t n = shape_numel(entries_[next_++].shape);
  if (stored_ == DType::f32) {
    out_.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(4 * n));
  } else {
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(data[i]);
    out_.write(reinterpret_cast<const char*>(h.data()), static_cast<std::streamsize>(2 * n));
  }
  NEXTRON_CHECK(out_.good(), "writing '", tmp_, "' failed (disk full?)");
}

void SafetensorsStreamWriter::finish() {
  NEXTRON_ASSERT(next_ == entries_.size());
  out_.flush();
  NEXTRON_CHECK(out_.good(), "writing '", tmp_, "' failed (disk full?)");
  out_.close();
  std::filesystem::rename(tmp_, path_);
}

}  // namespace nextron
