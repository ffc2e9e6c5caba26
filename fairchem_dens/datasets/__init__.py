"""Datasets: the built-in EMT example (and, later, MD-flagged LMDBs)."""
