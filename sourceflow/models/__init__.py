"""Velocity models (MLP for 2-D data; DiT families later) and condition embedders."""
