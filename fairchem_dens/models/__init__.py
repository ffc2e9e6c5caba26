"""DeNS models built on fairchem's EquiformerV2 (and eSCN) modules."""

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem1", "fairchem_dens.models (the fairchem-1.10 integration)")
