# Empty compiler generated dependencies file for nextron_unit_tests.
# This may be replaced when dependencies are built.
