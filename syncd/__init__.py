"""syncd: a sync daemon that mirrors hosted geospatial platforms into SQL."""

__version__ = "0.1.0"
