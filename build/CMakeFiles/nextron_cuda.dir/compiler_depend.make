# Empty compiler generated dependencies file for nextron_cuda.
# This may be replaced when dependencies are built.
