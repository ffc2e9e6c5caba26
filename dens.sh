#!/usr/bin/env bash
# One entry point that sets everything up, then runs what you ask for:
#   ./dens.sh quickstart     set up, then train/compare DeNS on the built-in GFN2-xTB ethanol example
#   ./dens.sh quickstart2    set up the fairchem-2 environment, then train/compare DeNS on EMT bulk metals
#                            through fairchem 2's `fairchem -c` (bulk_direct.yml; --head conservative)
#   ./dens.sh test [ARGS]    set up, then run the test suite (pytest ARGS): the fairchem-1.10 suite,
#                            then tests/fairchem2 in the fairchem-2 environment (ARGS naming
#                            tests/fairchem2 run only that one; other ARGS only the 1.10 suite)
#   ./dens.sh setup          only set up (the fairchem-1.10 environment); setup2: the fairchem-2 one
#   ./dens.sh run CMD...     run CMD inside the environment (e.g. fairchem --mode train ...)
#   ./dens.sh run2 CMD...    run CMD inside the fairchem-2 environment (e.g. fairchem -c CONFIG ...)
#
# The environment lives outside the repository (FAIRCHEM_DENS_ENV, default
# ~/.cache/fairchem-dens/venv) and holds what pyproject.toml lists: torch, then torch-scatter
# and torch-sparse, then this checkout (`pip install -e ".[fairchem1,test,xtb]"`); it is reused until
# pyproject.toml's requirements change. torch-scatter and torch-sparse are taken from
# FAIRCHEM_DENS_WHEELS (a folder of wheels) when set, else from ../shared/wheels when that
# exists, else from PyG's wheel index for the installed torch
# (https://data.pyg.org/whl/torch-X.Y.0+cpu.html or +cuXXX; override with
# FAIRCHEM_DENS_PYG_INDEX, skip with FAIRCHEM_DENS_PYG_INDEX=none), else built from source
# (CPU, ~30-60 min on 2 cores).
# The fairchem-2 integration gets its own environment (FAIRCHEM_DENS_ENV2, default
# ~/.cache/fairchem-dens/venv-fairchem2: `pip install -e ".[fairchem2,test]"`, torch 2.13, ~7 min):
# `./dens.sh test` sets it up for tests/fairchem2, `./dens.sh run2 CMD...` runs CMD inside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENV_DIR="${FAIRCHEM_DENS_ENV:-$HOME/.cache/fairchem-dens/venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

WHEELS="${FAIRCHEM_DENS_WHEELS:-}"
if [[ -z "$WHEELS" && -d "$ROOT/../shared/wheels" ]]; then
  WHEELS="$(cd "$ROOT/../shared/wheels" && pwd)"
fi

# pyproject.toml is the one list of requirements; the environment gets the plugin with these extras.
EXTRAS="fairchem1,test,xtb"
STAMP="$ENV_DIR/.fairchem-dens-complete"
ENV2_DIR="${FAIRCHEM_DENS_ENV2:-$HOME/.cache/fairchem-dens/venv-fairchem2}"
EXTRAS2="fairchem2,test"
PYG_TIMEOUT="${FAIRCHEM_DENS_PYG_TIMEOUT:-10}"

pyproject() {
  # `pyproject PYTHON hash`: a hash of what pyproject.toml asks the environment to hold (the
  # requirements, extras and scripts, not the package's own version: a release need not reinstall);
  # `pyproject PYTHON build`: the build requirements; `pyproject PYTHON requirement NAME...`: those
  # dependencies as written there. tomllib needs Python 3.11.
  "$1" - "$ROOT/pyproject.toml" "$EXTRAS" "${@:2}" <<'PY'
import hashlib, json, re, sys, tomllib
path, extras, what, *names = sys.argv[1:]
with open(path, "rb") as file:
    config = tomllib.load(file)
project = config["project"]
if what == "hash":
    keys = ("requires-python", "dependencies", "optional-dependencies", "scripts")
    wanted = [extras, config["build-system"], *(project[key] for key in keys)]
    print(hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16])
elif what == "build":
    print("\n".join(config["build-system"]["requires"]))
else:
    # an extra's pin wins over the base requirement of the same name (torch, numpy, ase)
    wanted = [*project["dependencies"], *(r for extra in extras.split(",")
                                          for r in project["optional-dependencies"].get(extra, []))]
    by_name = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]: r for r in wanted}
    missing = [name for name in names if name not in by_name]
    if missing:
        sys.exit(f"{path}: no {missing} in [project] dependencies or the extras {extras}")
    print("\n".join(by_name[name] for name in names))
PY
}

pyg_index() {
  # PyG publishes one wheel folder per torch minor series and CPU/CUDA build.
  "$ENV_DIR/bin/python" -c '
import torch
major, minor = torch.__version__.split("+")[0].split(".")[:2]
build = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
print(f"https://data.pyg.org/whl/torch-{major}.{minor}.0+{build}.html")'
}

install_scatter() {
  # --no-deps: their own requirements (scipy) come with the plugin, pinned by pyproject.toml.
  if [[ -n "$WHEELS" ]]; then
    echo ">> torch-scatter / torch-sparse from $WHEELS"
    "$ENV_DIR/bin/python" -m pip install --no-deps --find-links "$WHEELS" "${SCATTER[@]}"
    return
  fi
  local index="${FAIRCHEM_DENS_PYG_INDEX:-$(pyg_index)}"
  if [[ "$index" != "none" ]]; then
    echo ">> torch-scatter / torch-sparse wheels from $index (timeout ${PYG_TIMEOUT}s)"
    # Wheels only: an unreachable index must not fall through to PyPI's sdists here.
    if "$ENV_DIR/bin/python" -m pip install --no-deps --timeout "$PYG_TIMEOUT" --retries 0 \
        --only-binary torch-scatter,torch-sparse --find-links "$index" "${SCATTER[@]}"; then
      return
    fi
    echo ">> no matching wheels from $index (unreachable or missing); building from source"
  fi
  echo ">> building torch-scatter / torch-sparse from source (CPU); set FAIRCHEM_DENS_WHEELS to skip"
  "$ENV_DIR/bin/python" -m pip install --no-deps --no-build-isolation "${SCATTER[@]}"
}

setup_env() {
  if [[ -x "$ENV_DIR/bin/python" && -f "$STAMP" ]] &&
      [[ "$(cat "$STAMP")" == "$(pyproject "$ENV_DIR/bin/python" hash)" ]]; then
    return 0
  fi
  echo ">> setting up the environment in $ENV_DIR (first run: a few minutes, torch is ~3 GB)"
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "fairchem-dens needs Python 3.11 (fairchem-core 1.10 + torch 2.4); set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  [[ -x "$ENV_DIR/bin/python" ]] || "$PYTHON" -m venv "$ENV_DIR"
  local python="$ENV_DIR/bin/python" lines
  local -a first
  "$python" -m pip install --quiet --upgrade pip
  # torch and the build requirements first: torch-scatter/torch-sparse wheels (or their source
  # build) are made for one torch series, and PyPI has no wheels of them for pip to resolve.
  lines="$(pyproject "$python" requirement torch && pyproject "$python" build)"
  mapfile -t first <<< "$lines"
  "$python" -m pip install "${first[@]}"
  lines="$(pyproject "$python" requirement torch-scatter torch-sparse)"
  mapfile -t SCATTER <<< "$lines"
  install_scatter
  "$python" -m pip install -e "$ROOT[$EXTRAS]"
  pyproject "$python" hash > "$STAMP"
}

install_plugin() {
  # Editable install of this checkout into ENV (default the fairchem-1.10 one); redone only when the
  # checkout moved (a fresh clone beside an environment made by another one).
  local env="${1:-$ENV_DIR}" where
  where="$(cd / && "$env/bin/python" -c 'import fairchem_dens, os; print(os.path.dirname(os.path.dirname(fairchem_dens.__file__)))' 2>/dev/null || true)"
  if [[ "$where" != "$ROOT" ]]; then
    "$env/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
  fi
}

setup_env2() {
  # fairchem-core 2.x and torch 2.13 from PyPI, then this checkout: no torch-scatter to place first.
  local stamp="$ENV2_DIR/.fairchem-dens-complete"
  if [[ -x "$ENV2_DIR/bin/python" && -f "$stamp" ]] &&
      [[ "$(cat "$stamp")" == "$(EXTRAS="$EXTRAS2" pyproject "$ENV2_DIR/bin/python" hash)" ]]; then
    return 0
  fi
  echo ">> setting up the fairchem-2 environment in $ENV2_DIR (first run: ~7 minutes, torch 2.13)"
  [[ -x "$ENV2_DIR/bin/python" ]] || "$PYTHON" -m venv "$ENV2_DIR"
  "$ENV2_DIR/bin/python" -m pip install --quiet --upgrade pip
  "$ENV2_DIR/bin/python" -m pip install -e "$ROOT[$EXTRAS2]"
  EXTRAS="$EXTRAS2" pyproject "$ENV2_DIR/bin/python" hash > "$stamp"
}

run_tests() {
  # Both suites without ARGS; with ARGS the one they name (tests/fairchem2 or the 1.10 suite).
  local arg fairchem2=0 others=0 status=0
  for arg in "$@"; do
    case "$arg" in tests/fairchem2*) fairchem2=1 ;; -*) ;; *) others=1 ;; esac
  done
  cd "$ROOT"
  if [[ $fairchem2 -eq 0 ]]; then
    setup_env; install_plugin
    "$ENV_DIR/bin/python" -m pytest "$@" || status=$?
  fi
  if [[ $fairchem2 -eq 1 || $# -eq 0 || $others -eq 0 ]]; then
    setup_env2; install_plugin "$ENV2_DIR"
    if [[ $fairchem2 -eq 1 ]]; then
      "$ENV2_DIR/bin/python" -m pytest "$@" || status=$?
    else
      "$ENV2_DIR/bin/python" -m pytest "$@" tests/fairchem2 || status=$?
    fi
  fi
  return $status
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  setup) setup_env; install_plugin ;;
  setup2) setup_env2; install_plugin "$ENV2_DIR" ;;
  quickstart) setup_env; install_plugin; cd "$ROOT"; exec "$ENV_DIR/bin/fairchem-dens" quickstart "$@" ;;
  quickstart2) setup_env2; install_plugin "$ENV2_DIR"; cd "$ROOT"; exec "$ENV2_DIR/bin/fairchem-dens" quickstart2 "$@" ;;
  test) run_tests "$@" ;;
  run) setup_env; install_plugin; export PATH="$ENV_DIR/bin:$PATH"; exec "$@" ;;
  run2) setup_env2; install_plugin "$ENV2_DIR"; export PATH="$ENV2_DIR/bin:$PATH"; exec "$@" ;;
 *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
