"""Defaults of the profiler that the CLI shows without importing the profiler (and torch)."""

from __future__ import annotations

DEFAULT_CODECS = ("raw", "fp16+lz4", "int8+lz4", "jpeg")  # wire codecs 'edgesplit profile' measures unless told
# (jpeg, the input image as a JPEG at quality 90, only at the input cut)
