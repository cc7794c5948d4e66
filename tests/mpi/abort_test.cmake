# A failure on one rank must end the whole job: rank 1 calls abort_all while the other ranks wait in a barrier.
# Passes when mpiexec exits nonzero within the time limit and stderr carries "nextron: rank 1: ...".
# Usage: cmake -DMPIEXEC=mpiexec -DNP_FLAG=-n -DTEST_EXE=nextron_mpi_tests -P abort_test.cmake
foreach(var MPIEXEC NP_FLAG TEST_EXE)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "abort_test.cmake: pass -D${var}=...")
  endif()
endforeach()

set(limit 30)
string(TIMESTAMP start "%s" UTC)
execute_process(
  COMMAND ${MPIEXEC} --allow-run-as-root --oversubscribe ${NP_FLAG} 4 ${TEST_EXE} --abort-test
  RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT ${limit})
string(TIMESTAMP stop "%s" UTC)
math(EXPR elapsed "${stop} - ${start}")
message(STATUS "mpiexec exited with '${result}' after about ${elapsed} s")

if(NOT result MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the job did not end on its own (${result}): a rank calling abort_all must end the job\n"
                      "stdout:\n${out}\nstderr:\n${err}")
endif()
if(result EQUAL 0)
  message(FATAL_ERROR "mpiexec exited 0 although rank 1 called abort_all\nstdout:\n${out}\nstderr:\n${err}")
endif()
if(NOT err MATCHES "nextron: rank 1: deliberate failure \\(--abort-test\\)")
  message(FATAL_ERROR "stderr lacks 'nextron: rank 1: deliberate failure (--abort-test)'\nstderr:\n${err}")
endif()
if(err MATCHES "passed a barrier")
  message(FATAL_ERROR "a rank passed the barrier the aborted rank never entered\nstderr:\n${err}")
endif()
message(STATUS "abort_all ended the 4-rank job with status ${result} in about ${elapsed} s")
