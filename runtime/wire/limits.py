"""Size limits of the wire that configuration needs without importing the codecs (and torch)."""

from __future__ import annotations

DEFAULT_MAX_BYTES = 256 * 2**20
"""Cap on a decoded tensor and on any decompressed buffer (bytes)."""
