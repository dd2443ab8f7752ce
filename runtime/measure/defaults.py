"""Defaults of the profiler that the CLI shows without importing the profiler (and torch)."""

from __future__ import annotations

DEFAULT_CODECS = ("raw", "fp16+lz4", "int8+lz4", "jpeg", "pixels+lz4")  # wire codecs 'edgesplit profile' measures
# unless told (jpeg, the input image as a JPEG at quality 90, and pixels+lz4, the input image as lossless 8-bit
# pixels, only at the input cut)
