"""Zarr latent stores (layout, shard-aligned writers with resume, readers) and their statistics."""
