"""Datasets: the built-in EMT example (and, later, MD-flagged LMDBs)."""

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem1", "fairchem_dens.datasets (the fairchem-1.10 integration)")
