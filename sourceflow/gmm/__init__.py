"""Diagonal Gaussian mixtures: log-densities and posteriors (later: chunked EM, spatial GMMs)."""
