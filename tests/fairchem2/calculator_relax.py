"""A few BFGS steps through fairchem's own ASE calculator, with this package unimportable.

Run as ``python calculator_relax.py CHECKPOINT SETTINGS`` (SETTINGS: ``default`` for
``load_predict_unit``'s own default, or a preset name such as ``batch``); prints one JSON
line: the vectorisation torch's compiler picked, the start energy and forces, the steps run.
"""

import json
import sys

sys.modules["fairchem_dens"] = None  # importing the plugin now fails, as on a machine without it

import numpy as np  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.optimize import BFGS  # noqa: E402
from fairchem.core import FAIRChemCalculator  # noqa: E402
from fairchem.core.units.mlip_unit import load_predict_unit  # noqa: E402
from torch._inductor.cpu_vec_isa import pick_vec_isa  # noqa: E402

checkpoint, settings = sys.argv[1], sys.argv[2]
unit = (
    load_predict_unit(checkpoint, device="cpu")
    if settings == "default"
    else load_predict_unit(checkpoint, settings, device="cpu")
)
atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 2, 2))  # 32 atoms, two metals
atoms.numbers[::4] = 47
atoms.rattle(0.05, seed=3)
atoms.calc = FAIRChemCalculator(unit, task_name="emt")
energy, forces = float(atoms.get_potential_energy()), atoms.get_forces().tolist()
optimizer = BFGS(atoms, logfile=None)
optimizer.run(fmax=1e-6, steps=3)
print(
    "RESULT "
    + json.dumps(
        {
            "isa": str(pick_vec_isa()),
            "energy": energy,
            "forces": forces,
            "steps": optimizer.nsteps,
            "final_energy": float(atoms.get_potential_energy()),
            "finite": bool(np.isfinite(atoms.get_forces()).all()),
        }
    )
)
