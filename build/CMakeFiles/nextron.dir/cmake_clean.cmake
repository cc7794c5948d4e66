file(REMOVE_RECURSE
  "CMakeFiles/nextron.dir/src/core/dtype.cpp.o"
  "CMakeFiles/nextron.dir/src/core/dtype.cpp.o.d"
  "CMakeFiles/nextron.dir/src/core/parallel_for.cpp.o"
  "CMakeFiles/nextron.dir/src/core/parallel_for.cpp.o.d"
  "CMakeFiles/nextron.dir/src/core/tensor.cpp.o"
  "CMakeFiles/nextron.dir/src/core/tensor.cpp.o.d"
  "CMakeFiles/nextron.dir/src/kernels/cpu/blas.cpp.o"
  "CMakeFiles/nextron.dir/src/kernels/cpu/blas.cpp.o.d"
  "CMakeFiles/nextron.dir/src/kernels/cpu/linear.cpp.o"
  "CMakeFiles/nextron.dir/src/kernels/cpu/linear.cpp.o.d"
  "libnextron.a"
  "libnextron.pdb"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/nextron.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
