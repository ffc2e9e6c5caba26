"""fairchem-dens: DeNS (Denoising Non-Equilibrium Structures) for fairchem-core 1.x."""

from setuptools import find_packages, setup

setup(
    name="fairchem-dens",
    version="0.1.0",
    description=(
        "DeNS (arXiv 2403.09549) for fairchem-core 1.x EquiformerV2 and eSCN: "
        "models, trainer and configs driven by fairchem's own command line."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["fairchem_dens", "fairchem_dens.*"]),
    # The configs and the example trajectory ship with the package (fairchem_dens.resources).
    package_data={"fairchem_dens": ["configs/**/*.yml", "examples/*.npz", "examples/*.md"]},
    install_requires=[
        "fairchem-core==1.10.0",
        # fairchem-core 1.10 imports scipy.special.sph_harm, removed in SciPy 1.15.
        "scipy<1.15",
        "numpy<2",
        "torch>=2.4,<2.5",
        "torch-geometric",
        "e3nn",
        "lmdb",
        "submitit",
        # fairchem 1.10's relaxations implement the Optimizable API of ASE <= 3.24.
        "ase>=3.23,<3.25",
        # .aselmdb files (MPtrj, OMat24) with ASE < 3.25: datasets/ase_db.py, datasets/emt_bulk.py.
        "ase-db-backends>=0.10",
        # imported by fairchem-core at start-up; see README "Installing".
        "torch-scatter",
        "torch-sparse",
    ],
    extras_require={
        # tblite: GFN2-xTB labels of `fairchem-dens make-xtb-md17` (tests/test_xtb_md17.py)
        "test": ["pytest", "matplotlib", "tblite"],
        "plot": ["matplotlib"],
        "xtb": ["tblite"],
    },
    entry_points={"console_scripts": ["fairchem-dens=fairchem_dens.cli:main"]},
)
