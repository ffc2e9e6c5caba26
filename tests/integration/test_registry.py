"""Our registry names never overwrite fairchem's, and dotted paths resolve in a fresh process."""

from __future__ import annotations

import subprocess
import sys


def test_our_names_do_not_collide_with_fairchems():
    code = """
from fairchem.core.common.registry import registry
from fairchem.core.common.utils import setup_imports
setup_imports()
before = {kind: dict(registry.mapping[kind]) for kind in registry.mapping if kind.endswith('_mapping')}
import fairchem_dens.models.equiformer_v2, fairchem_dens.models.escn, fairchem_dens.trainers.dens, fairchem_dens.datasets.lmdb_dataset, fairchem_dens.datasets.ase_db
after = {kind: dict(registry.mapping[kind]) for kind in registry.mapping if kind.endswith('_mapping')}
new = {kind: sorted(set(after[kind]) - set(before.get(kind, {}))) for kind in after}
replaced = [(kind, name) for kind in before for name in before[kind] if after[kind][name] is not before[kind][name]]
print(repr((new, replaced)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new, replaced = eval(result.stdout.strip().splitlines()[-1])
    assert replaced == []
    assert new["model_name_mapping"] == [
        "fairchem_dens_eqv2_backbone",
        "fairchem_dens_eqv2_energy_head",
        "fairchem_dens_eqv2_force_head",
        "fairchem_dens_escn_backbone",
        "fairchem_dens_escn_force_head",
    ]
    assert new["trainer_name_mapping"] == ["fairchem_dens_trainer"]
    assert new["dataset_name_mapping"] == ["fairchem_dens_ase_db", "fairchem_dens_lmdb"]
    # and none of the names fairchem 1.10 took for its own DeNS port
    taken = {"equiformer_v2_dens_backbone", "eqV2_DeNS_scalar_head", "eqV2_DeNS_vector_head", "equiformerv2_dens"}
    assert not taken & {name for names in new.values() for name in names}


def test_dotted_paths_resolve_without_importing_the_plugin_first():
    code = """
import sys
from fairchem.core.common.registry import registry
assert 'fairchem_dens' not in sys.modules
cls = registry.get_trainer_class('fairchem_dens.trainers.dens.DeNSTrainer')
backbone = registry.get_model_class('fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone')
print(cls.__name__, backbone.__name__, registry.get_trainer_class('fairchem_dens_trainer').__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["DeNSTrainer", "DeNSEquiformerV2Backbone", "DeNSTrainer"]


def test_version_check_names_the_requirement():
    from fairchem_dens.versions import pinned_fairchem

    assert pinned_fairchem("fairchem1") == "1.10.0"  # read from the installed metadata (pyproject.toml)
    code = """
import importlib.metadata as m
real = m.version
m.version = lambda name: '2.0.0' if name == 'fairchem-core' else real(name)
import fairchem_dens.core  # the core needs no fairchem
try:
    import fairchem_dens.trainers.dens
except ImportError as error:
    print(type(error).__name__, error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "FairchemVersionError" in result.stdout, result.stderr
    assert "fairchem-core==1.10.0" in result.stdout and "found fairchem-core==2.0.0" in result.stdout
