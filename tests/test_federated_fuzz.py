"""Fuzz the shared trainer from its own OpenAPI description (schemathesis) on loopback: never a 5xx.

Each generated case is sent twice, as generated and with a valid worker token, so the fuzzing also reaches
past authentication into task, body and metrics validation. The example count is bounded to keep the run
short; Hypothesis' health checks are off because a live server is slower than they expect.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import schemathesis
from federated_proc import TOKENS, TrainerProcess, fake_base, write_data
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzzed_trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerProcess]:
    home = tmp_path_factory.mktemp("fuzz")
    proc = TrainerProcess(home / "home", fake_base(home / "base"), write_data(home / "data.jsonl"),
                          args=["--num-tasks-per-round", "2", "--max-body-bytes", "65536", "--adapter-name", ""])
    proc.start()
    yield proc
    proc.stop(signal.SIGKILL)


def test_no_server_error(fuzzed_trainer: TrainerProcess) -> None:
    schema = schemathesis.openapi.from_url(fuzzed_trainer.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/get_task", "/get_lora_weights", "/submit_update", "/status",
                                             "/health", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case: schemathesis.Case) -> None:
            for headers in (None, {"Authorization": f"Bearer {TOKENS[0]}"}):
                response = case.call(base_url=fuzzed_trainer.url, headers=headers, timeout=30)
                assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                    response.text[:500])
                case.validate_response(response, checks=[not_a_server_error])

        fuzz()
    assert fuzzed_trainer.proc is not None and fuzzed_trainer.proc.poll() is None
    assert fuzzed_trainer.get("/health")[0] == 200
