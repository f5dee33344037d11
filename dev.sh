#!/usr/bin/env bash
# Set-up and entry points of precise-rl. Each command first makes sure the virtual
# environment (.venv) holds the project and its dependencies, installing what is missing.
#
#   ./dev.sh train [ARGS...]     the main job: GRPO on the built-in task (precise-rl train ARGS)
#   ./dev.sh test [PYTEST ARGS]  the test suite
#   ./dev.sh fidelity [ARGS...]  the sampler fidelity report
#   ./dev.sh bench               the benchmarks in benchmarks/
#   ./dev.sh lint                ruff, and lint-imports (the one-way layers of pyproject.toml)
#   ./dev.sh docs [ARGS...]      serve the documentation site locally (mkdocs serve; `build` builds it strictly)
#   ./dev.sh run CMD [ARGS...]   any precise-rl subcommand
#
# On a machine without an NVIDIA GPU, torch is installed as the CPU build first
# (TORCH_SPEC, default torch==2.13.0); set PRECISE_RL_VENV to use another environment.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PRECISE_RL_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    echo "[dev.sh] creating $VENV" >&2
    python3 -m venv "$VENV"
  fi
  local stamp
  stamp="$VENV/.precise-rl-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
      if command -v nvidia-smi >/dev/null 2>&1; then
        echo "[dev.sh] installing torch (GPU machine)" >&2
        "$PY" -m pip install -q "${TORCH_SPEC:-torch}"
      else
        echo "[dev.sh] installing the CPU build of torch first (${TORCH_SPEC:-torch==2.13.0})" >&2
        "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
      fi
    fi
    echo "[dev.sh] installing precise-rl and its dependencies into $VENV" >&2
    "$PY" -m pip install -q -e ".[dev]"
    touch "$stamp"
  fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  train) setup; exec "$VENV/bin/precise-rl" train "$@" ;;
  test) setup; exec "$PY" -m pytest "$@" ;;
  fidelity) setup; exec "$VENV/bin/precise-rl" fidelity "$@" ;;
  bench) setup; for b in benchmarks/[!_]*.py; do echo "== $b"; "$PY" "$b"; done ;;
  lint) setup; "$VENV/bin/ruff" check . && "$VENV/bin/ruff" format --check . && "$VENV/bin/lint-imports" ;;
  docs)
    setup
    export NO_MKDOCS_2_WARNING=1
    if [ "${1:-serve}" = build ]; then exec "$VENV/bin/mkdocs" build --strict --quiet; fi
    exec "$VENV/bin/mkdocs" serve "$@" ;;
  run) setup; exec "$VENV/bin/precise-rl" "$@" ;;
  setup) setup ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] ;;
esac
