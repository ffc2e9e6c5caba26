"""Linear per-element energy references fitted on a training set (OC22 total energies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fairchem_dens.files import atomic_write

__all__ = ["fit_element_references"]


def fit_element_references(
    train_src: str | Path,
    output: Path,
    *,
    dataset_format: str = "oc22_lmdb",
    batch_size: int = 64,
    num_batches: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Fits E ≈ sum_i c[Z_i] by least squares with fairchem's own fitting code.

    Args:
        train_src: the training data (folder or file).
        output: the ``.npz`` to write, holding ``element_references`` as fairchem's
            ``element_references: {energy: {file: ...}}`` transform reads it.
        dataset_format: fairchem dataset format of ``train_src``.
        batch_size: structures per fitting batch.
        num_batches: batches to use (default: the whole set).
        overwrite: replace an existing ``output``.
        seed: shuffling seed.
    """
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.modules.normalization.element_references import fit_linear_references

    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    setup_imports()
    dataset = registry.get_dataset_class(dataset_format)({"src": str(train_src)})
    if len(dataset) == 0:
        raise ValueError(f"{train_src} holds no entries")
    sample = dataset[0]
    if getattr(sample, "energy", None) is None and getattr(sample, "y", None) is None:
        raise ValueError(f"{train_src}: entries have no `energy` (or `y`) to fit references to")
    if getattr(sample, "energy", None) is None:
        dataset.key_mapping = {"y": "energy"}  # OC22 LMDBs store the energy as `y`
    references = fit_linear_references(["energy"], dataset, batch_size=batch_size, num_batches=num_batches, seed=seed)[
        "energy"
    ]
    with atomic_write(output) as temp, open(temp, "wb") as handle:  # a handle: np.savez would add ".npz"
        np.savez(handle, element_references=references.element_references.cpu().numpy())
    return output
