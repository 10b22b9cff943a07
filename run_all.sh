#!/usr/bin/env bash
# Reproduce the whole recipe from a fresh clone.
#   ./run_all.sh [--profile NAME] [--data DIR] [--name RUN] [--workdir DIR] [--force] [-p KEY VALUE]... [--jobs N] ...
#                                              the pipeline -> <workdir>/submissions/<name>.csv (--help: all options)
#   ./run_all.sh --test [PYTEST ARGS]...       the lint (ruff) and the test suite (-m "not slow": the fast lane)
#   ./run_all.sh --no-venv ...                 either, in the current Python environment (Kaggle, Colab): installs only
#                                              what is missing (never torch); with --workdir DIR it writes
#                                              nothing into the checkout
# Without --no-venv both create .venv from requirements.txt (+ this project, editable) when it is missing or
# requirements.txt changed.
set -euo pipefail
CALLER_DIR=$(pwd)  # relative paths on the command line are the caller's, not the checkout's
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONUNBUFFERED=1
export MPLBACKEND=${MPLBACKEND:-Agg}

PYTHON=${PYTHON:-python3}
VENV=.venv
KERNEL=percovid

# --no-venv and --test may stand anywhere, --workdir DIR too: it is taken here (made absolute from the caller's
# folder), set as PERCOVID_WORKDIR for the pipeline and the tests alike, and not passed on.
NO_VENV=0
TEST=0
WORKDIR=""
args=()
expect_workdir=0
for arg in "$@"; do
  if [ "$expect_workdir" = 1 ]; then WORKDIR=$arg; expect_workdir=0; continue; fi
  case "$arg" in
    --no-venv) NO_VENV=1 ;;
    --test) TEST=1 ;;
    --workdir) expect_workdir=1 ;;
    --workdir=*) WORKDIR=${arg#--workdir=} ;;
    *) args+=("$arg") ;;
  esac
done
if [ "$expect_workdir" = 1 ]; then echo "error: --workdir needs a folder" >&2; exit 2; fi
if [ ${#args[@]} -gt 0 ]; then set -- "${args[@]}"; else set --; fi
case "$WORKDIR" in ""|/*) ;; *) WORKDIR="$CALLER_DIR/$WORKDIR" ;; esac

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than Python 3.10 (tested with 3.11); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ "$NO_VENV" = 1 ]; then
  # The current environment: the checkout is imported in place (PYTHONPATH), bytecode and the Jupyter kernel live
  # in the workdir, so a read-only checkout (a Kaggle dataset) works.
  if [ -z "$WORKDIR" ]; then
    if [ ! -w . ]; then
      echo "error: the checkout $(pwd) is read-only: pass --workdir DIR (e.g. /kaggle/working) for the outputs" >&2
      exit 1
    fi
    WORKDIR=$(pwd)
  fi
  # a workdir that cannot be written: one line here, not a traceback of the kernel install below (root ignores
  # permission bits: a file is really created, with the temporary-file pattern a run's debris clean-up knows)
  probe="$WORKDIR/.write-check.tmp-${HOSTNAME:-host}-$$"
  if ! { mkdir -p "$WORKDIR" && : > "$probe"; } 2>/dev/null; then
    echo "error: --workdir $WORKDIR cannot be written (read-only or not permitted): pass --workdir DIR, a writable folder (e.g. /kaggle/working)" >&2
    exit 1
  fi
  rm -f "$probe"
  WORKDIR=$(cd "$WORKDIR" && pwd)
  export PERCOVID_WORKDIR="$WORKDIR" PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONPYCACHEPREFIX="$WORKDIR/.cache/pycache" JUPYTER_PATH="$WORKDIR/.cache/jupyter/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
  PY=$PYTHON
  "$PY" -m utils.requirements requirements.txt --install
  "$PY" -m ipykernel install --prefix "$WORKDIR/.cache/jupyter" --name "$KERNEL" \
    --display-name "Python (percovid, current environment)" >/dev/null
  RUFF=("$PY" -m ruff check --no-cache)
  PYTEST_CACHE=(-p no:cacheprovider)
else
  # pip prints one harmless warning per package for this machine's unused local indexes: keep logs readable.
  quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

  wanted=$(cat requirements.txt pyproject.toml run_all.sh | sha256sum | cut -d' ' -f1)  # here: cd'd to the checkout
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
    echo "setting up $VENV from requirements.txt (first run: a few minutes, ~6 GB with torch)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    quiet_pip install --quiet --upgrade pip
    quiet_pip install --quiet -r requirements.txt
    # The project itself, editable: `import utils` works in every notebook, kernel and Dask worker of the venv.
    quiet_pip install --quiet --no-deps -e .
    # A kernel registered inside the venv, so papermill (-k percovid) and Jupyter run the notebooks with these packages.
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name "$KERNEL" --display-name "Python (percovid .venv)" >/dev/null
    echo "$wanted" > "$VENV/.requirements.sha256"   # written last: an interrupted install is redone next time
  fi
  [ -z "$WORKDIR" ] || export PERCOVID_WORKDIR="$WORKDIR"
  PY=$VENV/bin/python
  RUFF=("$VENV/bin/ruff" check)
  PYTEST_CACHE=()
fi

if [ "$TEST" = 1 ]; then
  "${RUFF[@]}" --quiet utils tests notebooks
  exec "$PY" -m pytest ${PYTEST_CACHE[@]+"${PYTEST_CACHE[@]}"} "$@"
fi
# the pipeline resolves a relative --data, --profile FILE and -p pretrained_file/scans_csv from the caller's folder
PERCOVID_CALLER_DIR="$CALLER_DIR" exec "$PY" -m utils.pipeline --kernel "$KERNEL" "$@"
