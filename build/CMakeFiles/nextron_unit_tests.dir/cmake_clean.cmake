file(REMOVE_RECURSE
  "CMakeFiles/nextron_unit_tests.dir/tests/unit/test_linear.cpp.o"
  "CMakeFiles/nextron_unit_tests.dir/tests/unit/test_linear.cpp.o.d"
  "nextron_unit_tests"
  "nextron_unit_tests.pdb"
  "nextron_unit_tests[1]_tests.cmake"
)

# Per-language clean rules from dependency scanning.
foreach(lang CXX)
  include(CMakeFiles/nextron_unit_tests.dir/cmake_clean_${lang}.cmake OPTIONAL)
endforeach()
