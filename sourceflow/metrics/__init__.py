"""Metrics: Wasserstein distances for point clouds (here), later Fréchet distances and friends."""
