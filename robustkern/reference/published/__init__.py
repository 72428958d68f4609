"""Transcriptions of published code, written from reading the originals: the independent implementations that
tests and benchmarks compare robustkern against (and the arithmetic of the ``faithful=True`` modes, which exist to
reproduce an original's numbers). Nothing else in the library imports them."""
