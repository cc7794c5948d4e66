file(REMOVE_RECURSE
  "libnextron.a"
)
