"""Metrics: W2 for point clouds (wasserstein), path straightness (paths), the Fréchet distance and
feature statistics (frechet), Inception / feature-network features (features), k-NN precision/recall
and class coverage (prdc)."""
