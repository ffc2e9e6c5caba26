"""Datasets: MD17 / xTB / EMT data writers (either fairchem), and fairchem 1.10's dataset classes.

The modules that subclass fairchem 1.10's datasets (``ase_db``, ``lmdb_dataset``) check its version
on import; the writers import fairchem only where they make fairchem-1 entries, so that
``fairchem-dens md17-to-lmdb --aselmdb`` also runs in a fairchem-2 environment.
"""
