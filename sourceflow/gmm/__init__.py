"""Diagonal Gaussian mixtures: densities (diag), chunked EM (em), k-means++ seeds (kmeans), MM-FM spatial GMMs (spatial)."""
