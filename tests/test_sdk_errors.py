"""Each typed SDK exception, provoked against a real daemon (or a real closed port)."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import zyke.autostart
from daemon_proc import TOKEN, DaemonProcess
from zyke import (
    AuthenticationError,
    Client,
    DaemonNotRunning,
    ErrorCode,
    ProtocolError,
    UnknownAdapter,
    UnknownNpc,
    ZykeError,
    ZykeTimeout,
)
from zyke.errors import error_for_code


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}"


def test_daemon_not_running_on_a_closed_port() -> None:
    with Client(closed_port_url(), TOKEN) as client:
        with pytest.raises(DaemonNotRunning) as info:
            client.npc("brom", persona="A dwarf.")
        assert "zyke-daemon start" in str(info.value)
        assert isinstance(info.value, ZykeError) and isinstance(info.value, ConnectionError)
        assert not client.connected


def test_autostart_without_the_daemon_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zyke.autostart, "daemon_installed", lambda: False)
    with Client(closed_port_url(), TOKEN, autostart=True) as client, pytest.raises(DaemonNotRunning) as info:
        client.connect()
    assert "pip install 'zyke[daemon]'" in str(info.value)


def test_bad_token_raises_authentication_error(daemon: DaemonProcess) -> None:
    with Client(daemon.url, "not-the-token") as client:
        with pytest.raises(AuthenticationError) as info:
            client.connect()
        assert info.value.code == "unauthorized"
        assert isinstance(info.value, ProtocolError)
        assert "ZYKE_TOKEN" in str(info.value)


def test_daemon_error_codes_map_to_typed_errors(client: Client) -> None:
    with pytest.raises(UnknownNpc) as unknown:
        client.get_npc("nobody-here")
    assert unknown.value.code == "unknown_npc"
    assert unknown.value.request_id

    # the daemon checks that a default emotion is one of the NPC's emotions
    with pytest.raises(ProtocolError) as bad:
        client.npc("brom", persona="A dwarf.", emotions=["neutral"], default_emotion="furious")
    assert bad.value.code == "bad_frame"
    assert "furious" in bad.value.message

    npc = client.npc("brom", persona="A dwarf.")
    with pytest.raises(UnknownAdapter) as adapter:
        npc.say("Hi", adapter="no-such-adapter")
    assert adapter.value.code == "unknown_adapter"
    assert client.get_npc("brom").spec == npc.spec  # and the connection is still fine


def test_a_closed_client_refuses_calls(daemon: DaemonProcess) -> None:
    client = Client(daemon.url, daemon.token)
    client.ping()
    client.close()
    client.close()  # idempotent
    with pytest.raises(ZykeError):
        client.ping()


@pytest.mark.slow
def test_autostart_and_the_daemons_own_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """autostart=True starts a daemon where none answers (and stops it on close); a daemon-side
    timeout (its request_timeout_s, here tiny) arrives as ZykeTimeout with the daemon's code."""
    for name, value in {"ZYKE_DATA_DIR": tmp_path / "data", "ZYKE_CONFIG_DIR": tmp_path / "config",
                        "ZYKE_N_THREADS": "2", "ZYKE_REQUEST_TIMEOUT_S": "0.05"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("ZYKE_URL", raising=False)
    monkeypatch.delenv("ZYKE_TOKEN", raising=False)
    url = closed_port_url()
    client = Client(url, autostart=True, timeout=None)
    try:
        welcome = client.connect()  # token read from the file the new daemon wrote
        assert welcome.limits is not None and welcome.limits.request_timeout_s == 0.05
        started = client._async._connector.daemon
        assert started is not None and started.proc.poll() is None
        npc = client.npc("brom", persona="A dwarf who talks a lot.")
        with pytest.raises(ZykeTimeout) as info:
            npc.say("Tell me everything about your life, in great detail.", max_tokens=400)
        assert info.value.code == "timeout" and "client timeout" not in info.value.message
        assert isinstance(info.value, TimeoutError) and not isinstance(info.value, ProtocolError)
    finally:
        client.close()
    assert started.proc.poll() is not None  # stopped with the client
    with Client(url, "x") as other, pytest.raises(DaemonNotRunning):
        other.connect()


def test_zyke_timeout_is_a_timeout_error_and_not_a_protocol_error() -> None:
    err = ZykeTimeout("no answer", code="timeout", request_id="s1")
    assert not isinstance(err, ProtocolError)
    assert isinstance(err, ZykeError) and isinstance(err, TimeoutError)
    assert (err.code, err.request_id, err.message, err.details, str(err)) == (
        "timeout", "s1", "no answer", {}, "[timeout] no answer")
    # the daemon's own timeout code still maps to it, and pickling keeps the attributes
    mapped = error_for_code("timeout", "the daemon gave up", "s2")
    assert type(mapped) is ZykeTimeout and mapped.code == ErrorCode.TIMEOUT and mapped.request_id == "s2"
    copy = pickle.loads(pickle.dumps(mapped))
    assert type(copy) is ZykeTimeout and (copy.code, copy.message, copy.request_id) == (
        "timeout", "the daemon gave up", "s2")


def test_every_daemon_error_code_comes_back_on_its_exception() -> None:
    for code in ErrorCode:
        err = error_for_code(code.value, "m", "r1", {"k": 1})
        assert err.code == code and isinstance(err.code, ErrorCode)
        assert (err.message, err.request_id, err.details) == ("m", "r1", {"k": 1})
        assert isinstance(err, ZykeError)
        assert isinstance(err, ZykeTimeout) == (code == ErrorCode.TIMEOUT)
        assert isinstance(err, ProtocolError) == (code != ErrorCode.TIMEOUT)
    newer = error_for_code("from_the_future", "m")
    assert type(newer) is ProtocolError and newer.code == "from_the_future"


def test_a_client_side_timeout_is_a_timeout_error_not_a_protocol_error(client: Client) -> None:
    npc = client.npc("brom", persona="A dwarf.")
    with pytest.raises(ZykeTimeout) as info:
        npc.say("Hi", timeout=0)
    assert isinstance(info.value, TimeoutError) and not isinstance(info.value, ProtocolError)
    assert info.value.code == "timeout" and info.value.request_id
    assert "client timeout" in info.value.message
    client.ping()  # the client carries on
