#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv and install the project into it.
#
#   scripts/setup_env.sh            # idempotent; fast when .venv is already up to date
#
# Environment:
#   PYTHON              interpreter that creates the venv (default: python3)
#   LONGVU_TORCH_SPEC   torch requirement installed first when the venv has no torch
#                       (default: torch==2.13.0, the CPU build; a GPU machine may name its own)
#   LONGVU_EXTRAS       extras installed with the project (default: dev; dev and eval add lmms-eval)
#   LONGVU_LMMS_EVAL_SPEC  the lmms-eval requirement, installed with --no-deps (default: lmms-eval==0.7.3)
#   LONGVU_SETUP_FORCE  set to 1 to reinstall the project even when nothing changed
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${LONGVU_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${LONGVU_EXTRAS:-dev}"
LMMS_EVAL_SPEC="${LONGVU_LMMS_EVAL_SPEC:-lmms-eval==0.7.3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.longvu-setup"

log() { echo "[setup_env] $*" >&2; }

if [[ ! -x "$VPY" ]]; then
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

pip_install() { "$VPY" -m pip install --progress-bar off "$@"; }

# torch first, pinned, so the project's open `torch>=2.4` is already satisfied and pip does not
# pull a multi-GB CUDA build. An existing torch (e.g. a CUDA build on a GPU machine) is kept.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    log "installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi

# The project itself, editable. Skipped when pyproject.toml and the extras are unchanged since the
# last successful install and the console script is there.
want="$(cat pyproject.toml; echo "extras=$EXTRAS lmms=$LMMS_EVAL_SPEC")"
want="$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" == "$have" && -x "$VENV/bin/longvu" && "${LONGVU_SETUP_FORCE:-0}" != "1" ]]; then
    log "$VENV is up to date"
else
    log "installing the project: pip install -e .[$EXTRAS]"
    rm -f "$STAMP"
    pip_install -e ".[$EXTRAS]"
    # lmms-eval without its dependency set (which pulls a CUDA torch and downgrades av/wandb); the
    # `eval` extra (part of `dev`) holds the few packages it needs to import and run tasks
    if [[ ",$EXTRAS," == *",eval,"* || ",$EXTRAS," == *",dev,"* ]]; then
        pip_install --no-deps "$LMMS_EVAL_SPEC"
    fi
    echo "$want" >"$STAMP"
fi

# the project's own bytecode, once: every training rank, launcher and CLI process imports these
# modules, and a PYTHONDONTWRITEBYTECODE environment would otherwise compile them in each process
"$VPY" -m compileall -q longvu train data scripts >/dev/null
"$VPY" -c "import torch, transformers; print(f'[setup_env] torch {torch.__version__}, transformers {transformers.__version__}')" >&2
