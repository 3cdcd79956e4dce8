"""Datasets: registry of specs, download and extraction, builders, the prepared store, loaders."""
