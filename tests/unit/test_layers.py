"""The package's layers point one way: models never import the trainers."""

import subprocess
import sys


def test_models_import_no_trainer_module():
    probe = (
        "import sys, fairchem_dens.models.adapters, fairchem_dens.models.checkpoints, "
        "fairchem_dens.models.convert_original, fairchem_dens.models.to_conservative; "
        "print(sorted(m for m in sys.modules if m.startswith('fairchem_dens.trainers')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"models import trainer modules: {result.stdout.strip()}"
