# Empty compiler generated dependencies file for nextron.
# This may be replaced when dependencies are built.
