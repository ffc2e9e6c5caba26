"""Writes this folder: checkpoints, configs and predictions made by fairchem-dens at commit d1ce44f.

Run once, at that commit, before the package was reorganised (issue 19); the files are
committed so that tests/integration/test_public_paths.py can prove that what users saved
then still loads and predicts the same today. Re-running it on a later commit would
defeat its purpose.

    python tests/data/main_d1ce44f/make.py  # from the repository root, fairchem 1.10 env
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml
from fairchem.core.common.utils import load_config

HERE = Path(__file__).parent
QUICKSTART = HERE.parents[2] / "configs" / "quickstart"
RUNS = {  # name: (shipped config, data set)
    "eqv2_dens": ("eqv2_dens_tiny.yml", "emt_test"),
    "escn_dens": ("escn_dens_tiny.yml", "emt_test"),
    "esen_dens": ("esen_dens_bulk_tiny.yml", "bulk_test"),
    "esen_dens_conservative": ("esen_dens_conservative_bulk_tiny.yml", "bulk_test"),
}


def run(*args: str, cwd: Path) -> None:
    subprocess.run(["fairchem", *args, "--cpu", "--timestamp-id", "fx"], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["fairchem-dens", "make-emt-data", "emt", "--systems", "6"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["fairchem-dens", "make-emt-data", "bulk", "--bulk", "--families", "2", "--md-frames", "2"],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        data = {"emt_test": ("emt", "emt/test"), "bulk_test": ("bulk/aselmdb", "bulk/aselmdb/test")}
        for name, (root, test) in data.items():
            shutil.copytree(tmp / test, HERE / name, dirs_exist_ok=True)
        for name, (shipped, data_name) in RUNS.items():
            root = data[data_name][0]
            config, _, _ = load_config(str(QUICKSTART / shipped))  # includes resolved: one self-contained file
            config["optim"]["max_epochs"] = 1
            config["optim"]["eval_every"] = 1000
            for split in ("train", "val", "test"):
                config["dataset"][split]["src"] = str(tmp / root / split)
            (tmp / f"{name}.yml").write_text(yaml.safe_dump(config))
            run("--mode", "train", "--config-yml", f"{name}.yml", "--run-dir", f"run_{name}", cwd=tmp)
            checkpoint = tmp / f"run_{name}" / "checkpoints" / "fx" / "checkpoint.pt"
            run("--mode", "predict", "--config-yml", f"{name}.yml", "--run-dir", f"predict_{name}",
                "--checkpoint", str(checkpoint), cwd=tmp)
            (HERE / name).mkdir(exist_ok=True)
            shutil.copy(checkpoint, HERE / name / "checkpoint.pt")
            for split in ("train", "val", "test"):  # the committed config reads the committed test set
                config["dataset"][split]["src"] = data_name
            (HERE / name / "config.yml").write_text(yaml.safe_dump(config))
            shutil.copy(tmp / f"predict_{name}" / "results" / "fx" / "s2ef_predictions.npz",
                        HERE / name / "s2ef_predictions.npz")


if __name__ == "__main__":
    main()
