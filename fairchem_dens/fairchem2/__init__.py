"""DeNS on fairchem-core 2.x: eSCN-MD / UMA models, a train-eval unit and Hydra configs.

The DeNS rules (settings, corruption, roles, loss, metrics) come from
:mod:`fairchem_dens.core`; this package only connects them to fairchem 2 (configs: ``configs/fairchem2/``):

* :mod:`~fairchem_dens.fairchem2.models`: eSCN-MD (and the UMA mixture-of-experts
  backbone) with the force encoding, the direct DeNS force head and the conservative
  DeNS energy/forces/stress head;
* :mod:`~fairchem_dens.fairchem2.loss`: fairchem's task losses with DeNS roles;
* :mod:`~fairchem_dens.fairchem2.unit`: ``DeNSTrainEvalUnit``, fairchem's train-eval
  unit that corrupts training batches;
* :mod:`~fairchem_dens.fairchem2.export`: the plugin-free inference checkpoint;
* :mod:`~fairchem_dens.fairchem2.finetune`: a DeNS model from a fairchem-2 checkpoint
  (ours, eSEN-shaped or UMA);
* :mod:`~fairchem_dens.fairchem2.emt_data`: tiny EMT ``.aselmdb`` data for the configs.
"""

from fairchem_dens.versions import require_fairchem

require_fairchem("fairchem2", "fairchem_dens.fairchem2 (the fairchem-2 integration)")
