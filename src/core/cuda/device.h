// CUDA device discovery and error checking shared by the CUDA backend.
#pragma once

#include <string>

namespace nextron::cuda {

// Number of visible CUDA devices; 0 when there is no GPU or no driver (never throws).
int device_count();
// One line describing device `index` (name, memory, compute capability).
std::string device_description(int index);

}  // namespace nextron::cuda
