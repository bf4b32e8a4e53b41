#!/usr/bin/env bash
# The project's test command: set up (or reuse) the environment, lint, then run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh --dev
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
