"""fairchem-dens."""
