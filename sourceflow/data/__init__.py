"""Datasets: toy 2-D distributions (here), later digits, image folders, manifests and captions."""
