"""Raw Triton kernels and their launchers. Nothing is imported here: the modules import triton and are
loaded lazily by robustkern.ops / robustkern._backend."""
