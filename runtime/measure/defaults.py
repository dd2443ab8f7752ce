"""Defaults of the profiler that the CLI shows without importing the profiler (and torch)."""

from __future__ import annotations

DEFAULT_CODECS = ("raw", "fp16+lz4", "int8+lz4")  # wire codecs 'edgesplit profile' measures unless told
