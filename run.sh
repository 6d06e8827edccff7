#!/usr/bin/env bash
# One entry point: `bash run.sh demo [DIR]` or `bash run.sh test [pytest args]`.
# Both first run scripts/setup.sh, which installs whatever is missing.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
cmd="${1:-demo}"; shift || true
case "$cmd" in
    demo) exec .venv/bin/pyvirtiofs demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh demo [DIR] | bash run.sh test [pytest args]" >&2; exit 2 ;;
esac
