# Empty dependencies file for nextron_cuda.
# This may be replaced when dependencies are built.
