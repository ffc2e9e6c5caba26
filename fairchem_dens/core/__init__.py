"""The DeNS rules, once, for every integration: no fairchem, no torch-geometric.

Torch, numpy and e3nn only. One module an idea:

* :mod:`~fairchem_dens.core.settings`: the ``optim`` keys (:class:`DeNSConfig`);
* :mod:`~fairchem_dens.core.corruption`: seeded streams, which structures and atoms are
  corrupted, sigmas and noise (:func:`sample_corruption`);
* :mod:`~fairchem_dens.core.batch`: a corruption applied to a batch, and what it carries;
* :mod:`~fairchem_dens.core.encoding`: the forces as spherical-harmonic features;
* :mod:`~fairchem_dens.core.roles`: the outputs' names and DeNS roles;
* :mod:`~fairchem_dens.core.loss` and :mod:`~fairchem_dens.core.metrics`: the loss and
  the denoising metrics as functions of tensors;
* :mod:`~fairchem_dens.core.errors`: the refusals.
"""

from fairchem_dens.core.corruption import Corruption, sample_corruption, step_generator
from fairchem_dens.core.errors import DeNSConfigError, DeNSSetupError, NonFiniteLossError
from fairchem_dens.core.settings import DeNSConfig

__all__ = [
    "Corruption",
    "DeNSConfig",
    "DeNSConfigError",
    "DeNSSetupError",
    "NonFiniteLossError",
    "sample_corruption",
    "step_generator",
]
