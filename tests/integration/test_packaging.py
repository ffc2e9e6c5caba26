"""What pyproject.toml declares (every third-party module imported, the docs it cites; the only
dependency list) and what a wheel install holds."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from helpers import ROOT


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared_with_dependencies() -> set[str]:
    """The dependencies and the extras, plus everything those pull in (installed metadata)."""
    project = _project()
    todo = [_name(r) for r in project["dependencies"]]
    todo += [_name(r) for requirements in project["optional-dependencies"].values() for r in requirements]
    closure: set[str] = set()
    while todo:
        dist = todo.pop()
        if dist in closure:
            continue
        closure.add(dist)
        try:
            todo += [_name(r) for r in metadata.requires(dist) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return closure


def test_every_imported_distribution_is_declared():
    declared = _declared_with_dependencies()
    providers = metadata.packages_distributions()
    undeclared: dict[str, set[str]] = {}
    for path in sorted((ROOT / "fairchem_dens").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "fairchem_dens":
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not dists & declared:
                    undeclared.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in pyproject.toml (nor brought by what it declares): {undeclared}"


def test_doc_sections_cited_in_pyproject_exist():
    """Its comments cite `README "Heading"` or `docs/x.md "Heading"`: each heading is there."""
    cited = re.findall(r'(README|docs/[\w-]+\.md) "([^"]+)"', (ROOT / "pyproject.toml").read_text())
    missing = []
    for doc, heading in cited:
        path = ROOT / ("README.md" if doc == "README" else doc)
        text = path.read_text() if path.exists() else ""
        if heading not in re.findall(r"^#+ (.+)$", text, flags=re.M):
            missing.append(f'{doc} "{heading}"')
    assert cited and not missing, f"pyproject.toml cites sections that are not there: {missing}"


def test_pyproject_is_the_only_dependency_list():
    """No setup.py or requirements file beside it, and dens.sh pins no package (it reads pyproject.toml)."""
    others = [name for name in ("setup.py", "setup.cfg", "requirements.txt") if (ROOT / name).exists()]
    assert not others, f"dependency lists besides pyproject.toml: {others}"
    for script in ("dens.sh", ".ci/run"):
        pins = re.findall(r"[\w.-]+ *(?:==|>=|<=|~=|<|>) *\d[\w.]*", (ROOT / script).read_text())
        assert not pins, f"{script} pins {pins}: requirements belong in pyproject.toml"


def test_a_wheel_install_has_its_configs_and_runs_the_quickstart(tmp_path):
    """A user install: the wheel, installed away from the checkout, finds its configs and example data."""
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "fairchem_dens", source / "fairchem_dens", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # no build isolation: the build backend comes from this environment (the `test` extra), offline
    build_requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, build_requirements):
        installed = metadata.version(requirement.name)
        assert requirement.specifier.contains(installed), (
            f"{requirement.name} {installed} here; building the wheel needs {requirement} "
            f'(pip install "{requirement}", or ./dens.sh setup, which installs the test extra)'
        )
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    build = subprocess.run([*pip, "wheel", *offline, "-w", tmp_path / "dist", source], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fairchem_dens-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True, capture_output=True
    )
    user = tmp_path / "user"  # an empty folder: no checkout anywhere on the path
    user.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}

    def run(*command: str) -> str:
        result = subprocess.run(command, cwd=user, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (command, (result.stdout + result.stderr)[-3000:])
        return result.stdout

    where = run(sys.executable, "-c", "import fairchem_dens.resources as r; print(r.__file__); print(r.configs_dir())")
    assert all(line.startswith(str(site)) for line in where.split()), where  # the wheel's copy, not the checkout's
    command = [sys.executable, "-m", "fairchem_dens.cli"]
    run(*command, "configs", "--copy", "configs")
    shipped = sorted(p.relative_to(ROOT / "configs") for p in (ROOT / "configs").rglob("*.yml"))
    assert sorted(p.relative_to(user / "configs") for p in (user / "configs").rglob("*.yml")) == shipped
    # a copied recipe with relative includes still loads
    run(
        sys.executable,
        "-c",
        "from fairchem.core.common.utils import load_config; "
        "load_config('configs/oc20/2M/escn/escn_dens_N@12_L@6_M@2_epochs@20.yml')",
    )
    run(*command, "quickstart", "--workdir", "qs", "--epochs", "1", "--frames", "8", "--seeds", "0", "--jobs", "2")
    summary = json.loads((user / "qs" / "quickstart_results.json").read_text())
    assert set(summary) >= {"plain-seed0", "dens-seed0"}
    assert "denoising_pos_mae" in (user / "qs" / "runs" / "dens-seed0" / "train.log").read_text()


def test_configs_copy_never_replaces_a_folder_without_overwrite(tmp_path, capsys):
    from fairchem_dens import cli
    from fairchem_dens.resources import configs_dir

    assert cli.main(["configs"]) == 0 and capsys.readouterr().out.strip() == str(configs_dir())
    target = tmp_path / "configs"
    target.mkdir()
    (target / "mine.yml").write_text("optim: {max_epochs: 1}\n")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        cli.main(["configs", "--copy", str(target)])
    assert [p.name for p in target.iterdir()] == ["mine.yml"]  # nothing written
    assert cli.main(["configs", "--copy", str(target), "--overwrite"]) == 0
    assert (target / "mine.yml").exists() and (target / "quickstart" / "eqv2_dens_tiny.yml").exists()
