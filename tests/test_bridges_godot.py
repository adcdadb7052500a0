"""Static checks of the Godot 4 bridge (examples/godot_bridge): no Godot 4 binary runs in CI, so
every .gd file must parse and lint with gdtoolkit, and the hand-written .tscn/.cfg/.godot files
must be consistent (resources exist, ids and node parents resolve)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

gdparser = pytest.importorskip("gdtoolkit.parser", reason="gdtoolkit is not installed (pip install gdtoolkit)")
gdlinter = pytest.importorskip("gdtoolkit.linter")

BRIDGE = Path(__file__).resolve().parent.parent / "examples" / "godot_bridge"
ADDON = BRIDGE / "addons" / "zyke"
GD_FILES = sorted(BRIDGE.rglob("*.gd"))
TSCN_FILES = sorted(BRIDGE.rglob("*.tscn"))


def _res(path: str) -> Path:
    assert path.startswith("res://"), path
    return BRIDGE / path.removeprefix("res://")


def test_bridge_layout() -> None:
    for name in ["plugin.cfg", "plugin.gd", "zyke_client.gd", "zyke_npc.gd", "zyke_locator.gd",
                 "protocol_constants.gd"]:
        assert (ADDON / name).is_file(), name
    assert (BRIDGE / "README.md").is_file()
    assert TSCN_FILES, "demo scene missing"


@pytest.mark.parametrize("path", GD_FILES, ids=lambda p: str(p.relative_to(BRIDGE)))
def test_gdscript_parses(path: Path) -> None:
    gdparser.parser.parse(path.read_text(encoding="utf-8"))


def _lint_config():
    config = dict(gdlinter.DEFAULT_CONFIG)
    rc = BRIDGE / "gdlintrc"
    if rc.exists():
        import yaml  # gdtoolkit depends on PyYAML

        config.update(yaml.safe_load(rc.read_text()) or {})
    return config


@pytest.mark.parametrize("path", GD_FILES, ids=lambda p: str(p.relative_to(BRIDGE)))
def test_gdscript_lints_clean(path: Path) -> None:
    problems = gdlinter.lint_code(path.read_text(encoding="utf-8"), _lint_config())
    assert not problems, "\n".join(f"{path.name}:{p.line}: {p.name}: {p.description}" for p in problems)


def test_plugin_cfg_points_at_the_plugin_script() -> None:
    cfg = configparser.ConfigParser()
    cfg.read_string((ADDON / "plugin.cfg").read_text())
    script = cfg["plugin"]["script"].strip('"')
    assert (ADDON / script).is_file()
    text = (ADDON / script).read_text()
    assert "@tool" in text and "extends EditorPlugin" in text
    assert 'add_autoload_singleton(AUTOLOAD_NAME, AUTOLOAD_PATH)' in text
    path = re.search(r'AUTOLOAD_PATH := "([^"]+)"', text).group(1)
    assert _res(path).is_file()


def test_project_godot_autoload_and_main_scene() -> None:
    text = (BRIDGE / "project.godot").read_text()
    assert "config_version=5" in text
    autoload = re.search(r'^Zyke="\*(res://[^"]+)"$', text, re.M)
    assert autoload and _res(autoload.group(1)).is_file()
    main = re.search(r'^run/main_scene="(res://[^"]+)"$', text, re.M)
    assert main and _res(main.group(1)).is_file()


def test_zyke_api_surface() -> None:
    client = (ADDON / "zyke_client.gd").read_text()
    for signal in ["signal connected(", "signal disconnected(",
                   "signal reply_received(npc_id: String, reply: Dictionary, request_id: String)",
                   "signal delta_received(npc_id: String, text: String, request_id: String)",
                   "signal error(code: String, message: String, request_id: String)"]:
        assert signal in client
    npc = (ADDON / "zyke_npc.gd").read_text()
    assert "class_name ZykeNPC" in npc
    for needle in ["func say(\n\ttext: String,\n\tstate := {},\n\tallowed_actions := PackedStringArray(),\n"
                   "\tline_priority := \"\",\n\tdeadline_ms := 0\n) -> String:",
                   '@export_enum("normal", "foreground", "background") var priority',
                   "@export var action_descriptions: Dictionary", "@export var emotion_descriptions: Dictionary",
                   "func save_state() -> Dictionary:",
                   "func load_state(state: Dictionary) -> bool:", "@export var actions := PackedStringArray(",
                   "@export var emotions := PackedStringArray(", "@export_multiline var persona",
                   "@export var display_name"]:
        assert needle in npc, needle
    assert "allowed_actions := PackedStringArray()" in client and 'body["allowed_actions"]' in client
    assert 'body["priority"]' in client and 'body["deadline_ms"]' in client
    # Frame types and error codes come from the generated constants, never string literals.
    assert not re.search(r'"(npc\.say|npc\.define|reply\.delta|unknown_npc)"', client + npc)


_SECTION = re.compile(r"^\[(\w+)((?:\s+\w+=(?:\"[^\"]*\"|\S+))*)\]\s*$")
_ATTR = re.compile(r'(\w+)=("([^"]*)"|\S+)')


def _sections(text: str) -> list[tuple[str, dict[str, str], list[str]]]:
    out: list[tuple[str, dict[str, str], list[str]]] = []
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            attrs = {k: (q if q or v.startswith('"') else v) for k, v, q in _ATTR.findall(m.group(2))}
            out.append((m.group(1), attrs, []))
        elif line.strip():
            assert out, f"property before any section: {line!r}"
            assert re.match(r'^[\w/]+ = .+$', line), f"not a 'key = value' line: {line!r}"
            out[-1][2].append(line)
    return out


@pytest.mark.parametrize("path", TSCN_FILES, ids=lambda p: str(p.relative_to(BRIDGE)))
def test_tscn_is_consistent(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    sections = _sections(text)
    kind, header, _ = sections[0]
    assert kind == "gd_scene" and header["format"] == "3", "Godot 4 scenes are format=3"
    ext = {a["id"]: a for k, a, _ in sections if k == "ext_resource"}
    sub = {a["id"]: a for k, a, _ in sections if k == "sub_resource"}
    assert int(header["load_steps"]) == len(ext) + len(sub) + 1
    for res in ext.values():
        assert _res(res["path"]).is_file(), res["path"]
    nodes = [(a, props) for k, a, props in sections if k == "node"]
    root, _ = nodes[0]
    assert "parent" not in root and "type" in root
    known = {"."}
    for attrs, _props in nodes[1:]:
        assert attrs["parent"] in known, f"node {attrs['name']}: parent {attrs['parent']!r} not declared before"
        assert "type" in attrs or "instance" in attrs
        known.add(attrs["name"] if attrs["parent"] == "." else f"{attrs['parent']}/{attrs['name']}")
    for _attrs, props in nodes:
        for line in props:
            for ref in re.findall(r'ExtResource\("([^"]+)"\)', line):
                assert ref in ext, f"unknown ExtResource {ref}"
            for ref in re.findall(r'SubResource\("([^"]+)"\)', line):
                assert ref in sub, f"unknown SubResource {ref}"
    # Node paths the demo script reaches for exist in the scene.
    for attrs, props in nodes:
        for line in props:
            m = re.match(r'script = ExtResource\("([^"]+)"\)', line)
            if not m:
                continue
            script = _res(ext[m.group(1)]["path"]).read_text()
            base = "." if "parent" not in attrs else (
                attrs["name"] if attrs["parent"] == "." else f"{attrs['parent']}/{attrs['name']}")
            for node_path in re.findall(r"= \$([\w/]+)", script):
                full = node_path if base == "." else f"{base}/{node_path}"
                assert full in known, f"{path.name}: script uses ${node_path}, not in the scene"
            # Exported properties set in the scene exist on the script.
            for line2 in props:
                key = line2.split(" = ", 1)[0]
                if key not in {"script", "position", "layout_mode"} and "/" not in key and attrs.get("type") == "Node":
                    assert re.search(rf"@export\w*(\([^)]*\))? var {key}\b", script), f"{key} is not exported"


# -- The failure paths of issue 14. No Godot 4 runs here, so these read the parsed GDScript: each
# -- would fail on the addon before the fix (see the README's "Failure paths" review).


def _functions(path: Path) -> dict[str, str]:
    """Each top-level function's source text by name, cut along gdtoolkit's parse tree."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tree = gdparser.parser.parse(text, gather_metadata=True)
    out: dict[str, str] = {}
    for node in tree.children:
        if getattr(node, "data", None) in {"func_def", "static_func_def"}:
            func = node.children[0] if node.data == "static_func_def" else node
            header = func.children[0]
            name = str(next(t for t in header.children if getattr(t, "type", None) == "NAME"))
            out[name] = "\n".join(lines[node.meta.line - 1:node.meta.end_line])
    return out


def _const_int(path: Path, name: str) -> int:
    m = re.search(rf"^const {name} := ([0-9 *]+)$", path.read_text(encoding="utf-8"), re.M)
    assert m, f"{name} is not an integer constant in {path.name}"
    value = 1
    for factor in m.group(1).split("*"):
        value *= int(factor)
    return value


CLIENT_GD = ADDON / "zyke_client.gd"
NPC_GD = ADDON / "zyke_npc.gd"


def test_websocket_buffers_cover_the_daemons_frames() -> None:
    """Godot's WebSocketPeer buffers default to 64 KiB and a bigger message closes the socket."""
    from zyke_daemon import server
    from zyke_daemon.config import DaemonConfig

    needed = max(DaemonConfig().max_frame_bytes, getattr(server, "_WS_MAX_SIZE", 0))
    assert _const_int(CLIENT_GD, "BUFFER_BYTES") >= needed
    body = _functions(CLIENT_GD)["_open"]
    connect = body.index("connect_to_url(")
    for prop in ("inbound_buffer_size", "outbound_buffer_size"):
        m = re.search(rf"_ws\.{prop} = BUFFER_BYTES", body)
        assert m and m.start() < connect, f"_open must set _ws.{prop} before connect_to_url"


def test_autoload_keeps_running_while_the_game_is_paused() -> None:
    funcs = _functions(CLIENT_GD)
    setup = funcs.get("_init", "") + funcs.get("_ready", "")
    assert re.search(r"^\s+process_mode = (Node\.)?PROCESS_MODE_ALWAYS$", setup, re.M)


def test_every_request_has_a_failure_exit() -> None:
    """wait_for never hangs: answers that came before the wait are kept, unknown ids answer at once,
    and each place a request can wait in (_outbox, _pending, _waiting_defines) is emptied by
    close()/_fail_all and by the request timeout."""
    f = _functions(CLIENT_GD)
    wait = f["wait_for"]
    first_await = wait.index("await")
    assert wait.index("_answers.has(request_id)") < first_await, "an answer that came first must be found"
    assert wait.index("is_open(request_id)") < first_await, "an id nobody will answer must not be awaited"
    assert "_started.has(request_id)" in f["is_open"]
    # Every answer and failure is kept for a later wait_for, and closes the request.
    assert "_keep_answer(" in f["_fail"] and "_started.erase(request_id)" in f["_fail"]
    assert "_keep_answer(" in f["_handle_packet"] and "_started.erase(request_id)" in f["_handle_packet"]
    # Every request is tracked from the moment it is made.
    for name in ("_request", "define_npc"):
        assert "_started[request_id] = _now()" in f[name], name
    # A send that fails is answered (synchronously, hence the kept answers).
    assert re.search(r"if err != OK:[^\n]*\n(\s+[^\n]*\n)*?\s+_fail\(", f["_send"])
    # After close() nothing would send a queued request: it fails at once.
    for name in ("_request", "define_npc"):
        assert re.search(r"status == Status\.STOPPED:\n[^\n]*\n?\s+_fail\(request_id", f[name]), name
    # define_npc before connecting: its own request id goes out on welcome.
    assert "_waiting_defines[npc_id] = ids" in f["define_npc"]
    assert "_waiting_defines" in f["_on_hello_answer"]
    assert re.search(r"for request_id in ids:.*_send\(_frame\(ZykeProtocol\.FRAME_NPC_DEFINE, request_id",
                     f["_on_hello_answer"], re.S)
    # Each waiting place is failed by close() and by the timeout.
    for place in ("_pending", "_outbox", "_waiting_defines"):
        assert place in f["_fail_all"], f"_fail_all leaves {place} waiting"
        assert place in f["_expire"], f"request_timeout leaves {place} waiting"
    assert "_fail_all(" in f["close"] and "_fail_all(" in f["_stop"]
    assert "_expire_overdue(" in f["poll"] and "_expire(" in f["_expire_overdue"]
    # forget_npc fails a definition that was still waiting.
    assert "_fail(" in f["forget_npc"]
    # Values JSON cannot carry fail as invalid_argument instead of an error frame without an id.
    for name in ("_request", "define_npc"):
        assert "json_problem(" in f[name] and "INVALID_ARGUMENT" in f[name], name


def test_connection_errors_reach_the_npc() -> None:
    f = _functions(CLIENT_GD)
    report = f["_report_connection"]
    assert "connection_failed.emit(code, message)" in report and 'error.emit(code, message, "")' in report
    assert "_report_connection(CONNECTION_FAILED" in f["_on_closed"], "a failed connect must be reported"
    assert "_report_connection(code, message)" in f["_on_hello_answer"], "a refused hello must be reported"
    assert "_report_connection(VERSION_MISMATCH" in f["_on_hello_answer"]
    npc = _functions(NPC_GD)["_on_error"]
    assert 'request_id == ""' in npc, "ZykeNPC must pass on the connection's own errors (empty request id)"


def test_npc_inspector_values_are_made_valid() -> None:
    f = _functions(NPC_GD)
    assert "valid_id(String(name)" in f["_ready"], "the default id must be made valid from the node name"
    build = f["_build_spec"]
    assert "DEFAULT_PERSONA" in build, "an empty persona must get a default"
    assert "default_action in action_names" in build and "default_emotion in emotion_names" in build
    assert "ZykeProtocol.LABEL_PATTERN" in f["_valid_labels"]
    assert "ZykeProtocol.NPC_ID_PATTERN" in f["_is_valid_id"]
    assert "push_error(" in f["define"] and "push_warning(" in f["define"]


def test_demo_npc_definition_is_valid() -> None:
    """The demo scene's ZykeNPC values pass the daemon's own checks (schema and defaults)."""
    from zyke.protocol import NpcSpec

    text = (BRIDGE / "demo" / "demo.tscn").read_text(encoding="utf-8")
    props = dict(re.findall(r"^(\w+) = (.+)$", text.split('[node name="ZykeNPC"', 1)[1].split("[node", 1)[0], re.M))

    def strings(value: str) -> list[str]:
        return re.findall(r'"([^"]*)"', value)

    spec = NpcSpec.model_validate({
        "id": strings(props["npc_id"])[0], "persona": strings(props["persona"])[0],
        "actions": strings(props["actions"]), "emotions": strings(props["emotions"]),
        "defaults": {"action": strings(props["default_action"])[0], "emotion": strings(props["default_emotion"])[0]},
    })
    assert spec.defaults.action in spec.action_names and spec.defaults.emotion in spec.emotion_names
