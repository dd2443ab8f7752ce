"""edgesplit runtime: model slicing, wire codecs, the device agent and the edge worker."""

__version__ = "0.1.0"
