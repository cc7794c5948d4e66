// NumPy .npy files (format 1.0), so that any tool can read our outputs with numpy.load.
#pragma once

#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace nextron {

void write_npy(const std::string& path, const float* data, const Shape& shape);
void write_npy(const std::string& path, const int64_t* data, const Shape& shape);

}  // namespace nextron
