add_test([=[Linear.ForwardMatchesNaiveAndGradientsMatchFiniteDifferences]=]  /work/main/build/nextron_unit_tests [==[--gtest_filter=Linear.ForwardMatchesNaiveAndGradientsMatchFiniteDifferences]==] --gtest_also_run_disabled_tests)
set_tests_properties([=[Linear.ForwardMatchesNaiveAndGradientsMatchFiniteDifferences]=]  PROPERTIES WORKING_DIRECTORY /work/main/build SKIP_REGULAR_EXPRESSION [==[\[  SKIPPED \]]==])
set(  nextron_unit_tests_TESTS Linear.ForwardMatchesNaiveAndGradientsMatchFiniteDifferences)
