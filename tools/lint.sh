#!/usr/bin/env bash
# The guards against drift, in one place: tools/test.sh runs them before the tests, and the pre-commit hook
# (.pre-commit-config.yaml) before each commit. Needs the virtualenv tools/test.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
# Type-checked strictly: the SDK game code imports (with its protocol package), the model artifacts the daemon and
# training share (zyke_models), and the whole daemon: the sans-I/O core with what it imports (sessions, scheduler,
# safety, validation), the worker (the model thread's side), the backend contract and both backends (llama.cpp with
# its decoding loop, HF; the loader), the server shell with its HTTP API and completions, config, CLI and the rest,
# and training (zyke_train: data preparation, blocks, train, rl, evaluation, publishing, the federated trainer).
.venv/bin/mypy --strict --no-error-summary -p zyke -p zyke_models -p zyke_daemon -p zyke_train
# Both backends satisfy that contract (tests/test_backend_contract.py): a backend that stops conforming fails here
# even where its own module still type-checks.
.venv/bin/mypy --strict --no-error-summary --follow-imports=silent tests/test_backend_contract.py
