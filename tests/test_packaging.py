"""What setup.py declares: every third-party module the package imports, and the README it cites."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_keywords() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = (node for node in ast.walk(tree) if isinstance(node, ast.Call))
    call = next(node for node in calls if getattr(node.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared_with_dependencies() -> set[str]:
    """install_requires and the extras, plus everything those pull in (installed metadata)."""
    keywords = _setup_keywords()
    extras = ast.literal_eval(keywords["extras_require"])
    todo = [_name(r) for r in ast.literal_eval(keywords["install_requires"])]
    todo += [_name(r) for requirements in extras.values() for r in requirements]
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
    assert not undeclared, f"imported but not in setup.py (nor brought by what it declares): {undeclared}"


def test_readme_sections_cited_in_setup_py_exist():
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), flags=re.M))
    cited = re.findall(r'README "([^"]+)"', (ROOT / "setup.py").read_text())
    assert cited and not set(cited) - headings, f"setup.py cites {cited}; README headings: {sorted(headings)}"
