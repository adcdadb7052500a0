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
    for needle in ["func say(text: String, state := {}, allowed_actions := PackedStringArray()) -> String:",
                   "@export var action_descriptions: Dictionary", "@export var emotion_descriptions: Dictionary",
                   "func save_state() -> Dictionary:",
                   "func load_state(state: Dictionary) -> bool:", "@export var actions := PackedStringArray(",
                   "@export var emotions := PackedStringArray(", "@export_multiline var persona",
                   "@export var display_name"]:
        assert needle in npc, needle
    assert "allowed_actions := PackedStringArray()" in client and 'body["allowed_actions"]' in client
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
