file(REMOVE_RECURSE
  "libnextron_cuda.a"
)
