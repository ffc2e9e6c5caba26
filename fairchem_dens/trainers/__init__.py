"""The DeNS trainer."""

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem1", "fairchem_dens.trainers (the fairchem-1.10 integration)")
