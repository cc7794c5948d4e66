file(REMOVE_RECURSE
  "CMakeFiles/nextron_cuda.dir/src/core/cuda/device.cu.o"
  "CMakeFiles/nextron_cuda.dir/src/core/cuda/device.cu.o.d"
  "libnextron_cuda.a"
  "libnextron_cuda.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CUDA)
  include(CMakeFiles/nextron_cuda.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
