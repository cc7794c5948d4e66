// safetensors writer/reader round trip, bf16 rounding against closed-form values, and corrupt files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>

#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace nextron::test {

namespace {
std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("nextron_test_" + name)).string();
}
}  // namespace

TEST(Safetensors, RoundTripF32Bf16AndI64) {
  const std::string path = tmp_path("rt.safetensors");
  std::vector<float> a = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  // bf16 of 1 + 2^-8 is a tie between 1 and 1 + 2^-7: round to even gives 1. 1 + 3*2^-8 rounds up to 1 + 2^-6.
  std::vector<float> b = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -0.5f};
  std::vector<int64_t> ids = {5, -100, 123456789012};
  SafetensorsWriter w;
  w.add_f32("a", a.data(), {2, 3});
  w.add_f32("b", b.data(), {3}, DType::bf16);
  w.add_i64("ids", ids.data(), {3});
  w.write(path);
  SafetensorsReader r(path);
  EXPECT_EQ(r.entry("a").dtype, "F32");
  EXPECT_EQ(r.entry("b").dtype, "BF16");
  std::vector<float> a2(6);
  r.read_f32("a", a2.data(), {2, 3});
  EXPECT_EQ(a, a2);
  Tensor b2 = r.read_f32("b");
  EXPECT_EQ(b2.f32()[0], 1.0f);
  EXPECT_EQ(b2.f32()[1], 1.0f + 1.0f / 64);
  EXPECT_EQ(b2.f32()[2], -0.5f);
  EXPECT_EQ(r.read_i64("ids"), ids);
  EXPECT_THROW(r.read_f32("a", a2.data(), {3, 2}), Error);  // wrong shape
  EXPECT_THROW(r.entry("missing"), Error);
  // The data section starts 8-byte aligned.
  std::ifstream f(path, std::ios::binary);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  std::filesystem::remove(path);
}

TEST(Safetensors, CorruptFilesAreClearErrors) {
  const std::string path = tmp_path("corrupt.safetensors");
  std::vector<float> a(100, 1.0f);
  SafetensorsWriter w;
  w.add_f32("a", a.data(), {100});
  w.write(path);
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size - 10);  // truncated data
  try {
    SafetensorsReader r(path);
    FAIL() << "truncated file accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  {
    std::ofstream g(path, std::ios::binary | std::ios::trunc);
    uint64_t huge = 1ull << 40;
    g.write(reinterpret_cast<const char*>(&huge), 8);
  }
  EXPECT_THROW(SafetensorsReader r(path), Error);
  EXPECT_THROW(SafetensorsReader r(tmp_path("does_not_exist")), Error);
  std::filesystem::remove(path);
}

// A header of a million nested arrays (or objects inside a tensor entry) is an error, not a stack overflow: the JSON
// parser and the value's destruction do not recurse per level.
TEST(Safetensors, DeeplyNestedHeaderIsAnError) {
  const std::string path = tmp_path("nested.safetensors");
  const size_t depth = 1000000;
  for (const auto& [open, close, prefix, suffix] :
       {std::tuple<char, char, std::string, std::string>{'[', ']', "", ""},
        std::tuple<char, char, std::string, std::string>{'{', '}', "{\"a\":{\"dtype\":\"F32\",\"shape\":", "}}"}}) {
    std::string header = prefix;
    for (size_t i = 0; i < depth; ++i) header += open == '{' ? std::string("{\"x\":") : std::string(1, open);
    header += "0";
    header += std::string(depth, close);
    header += suffix;
    {
      std::ofstream g(path, std::ios::binary | std::ios::trunc);
      const uint64_t n = header.size();
      g.write(reinterpret_cast<const char*>(&n), 8);
      g.write(header.data(), static_cast<std::streamsize>(n));
    }
    EXPECT_THROW(SafetensorsReader r(path), Error) << "nesting of " << open;
  }
  std::filesystem::remove(path);
}

}  // namespace nextron::test
