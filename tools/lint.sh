#!/usr/bin/env bash
# The guards against drift, in one place: tools/test.sh runs them before the tests, and the pre-commit hook
# (.pre-commit-config.yaml) before each commit. Needs the virtualenv tools/test.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
# Type-checked strictly: the SDK game code imports (with its protocol package), the model artifacts the daemon and
# training share (zyke_models), the daemon's sans-I/O core with what it imports (sessions, scheduler, safety,
# validation), the worker (the model thread's side) and the backend contract; the server shell, the backends
# themselves and training are next.
.venv/bin/mypy --strict --no-error-summary -p zyke -p zyke_models -p zyke_daemon.core -p zyke_daemon.scheduler -p zyke_daemon.sessions \
    -p zyke_daemon.backends.base -p zyke_daemon.worker
# Both backends satisfy that contract (tests/test_backend_contract.py); errors inside the backends' own modules are not
# reported yet (silent), only a backend that stops conforming.
.venv/bin/mypy --strict --no-error-summary --follow-imports=silent tests/test_backend_contract.py
