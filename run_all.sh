#!/usr/bin/env bash
# Reproduce the whole recipe from a fresh clone.
#   ./run_all.sh [--profile NAME] [--data DIR] [--name RUN] [--force] [-p KEY VALUE]... [--jobs N] ...
#                                                               the pipeline -> submissions/<name>.csv (--help: all options)
#   ./run_all.sh --test [PYTEST ARGS]...                        the lint (ruff) and the test suite
# Both create .venv from requirements.txt (+ this project, editable) when it is missing or requirements.txt changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONUNBUFFERED=1
export MPLBACKEND=${MPLBACKEND:-Agg}

PYTHON=${PYTHON:-python3}
VENV=.venv
KERNEL=percovid

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than Python 3.10 (tested with 3.11); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# pip prints one harmless warning per package for this machine's unused local indexes: keep logs readable.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

wanted=$(cat requirements.txt pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
  echo "setting up $VENV from requirements.txt (first run: a few minutes, ~6 GB with torch)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  quiet_pip install --quiet --upgrade pip
  quiet_pip install --quiet -r requirements.txt
  # The project itself, editable: `import utils` works in every notebook, kernel and Dask worker of the venv.
  quiet_pip install --quiet --no-deps -e .
  # A kernel registered inside the venv, so papermill (-k percovid) runs the notebooks with these packages.
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "Python (percovid .venv)" >/dev/null
  echo "$wanted" > "$VENV/.requirements.sha256"   # written last: an interrupted install is redone next time
fi

if [ "${1:-}" = "--test" ]; then
  shift
  "$VENV/bin/ruff" check --quiet utils tests notebooks
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m utils.pipeline --kernel "$KERNEL" "$@"
