"""The schemas are the contract: their examples must validate, and the pydantic models must not drift."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter
from zyke.protocol import CLIENT_FRAMES, SERVER_FRAMES, NpcReply, NpcState, frame_types, load_schema
from zyke.protocol.models import Choice, GenerationOptions, NpcSpec, Turn
from zyke.protocol.validation import first_error, validator

ALL_FRAMES = {**CLIENT_FRAMES, **SERVER_FRAMES}


def test_schemas_are_read_from_the_installed_package() -> None:
    resource = files("zyke.schemas").joinpath("frames/npc.say.json")
    assert resource.is_file()
    assert load_schema("frames/npc.say")["$id"].endswith("/frames/npc.say.json")


def test_client_and_server_unions_cover_every_model() -> None:
    client, server = frame_types()
    assert set(client) == set(CLIENT_FRAMES)
    assert set(server) == set(SERVER_FRAMES)


@pytest.mark.parametrize("name", sorted(ALL_FRAMES))
def test_every_example_validates_and_parses(name: str) -> None:
    schema = load_schema(f"frames/{name}")
    assert schema["examples"], f"{name} has no example"
    union = "client" if name in CLIENT_FRAMES else "server"
    for example in schema["examples"]:
        assert first_error(f"frames/{name}", example) is None
        assert first_error(union, example) is None
        model = ALL_FRAMES[name].model_validate(example)
        dumped = model.model_dump(mode="json", exclude_unset=True)
        assert first_error(f"frames/{name}", dumped) is None
        assert dumped == example


def test_reply_examples_validate() -> None:
    for example in load_schema("npc_reply")["examples"]:
        assert first_error("npc_reply", example) is None
        NpcReply.model_validate(example)


def _schema_fields(schema: dict[str, Any], defs: dict[str, Any]) -> tuple[set[str], set[str]]:
    if "$ref" in schema and "#/$defs/" in schema["$ref"]:
        schema = defs[schema["$ref"].split("#/$defs/")[1]]
    return set(schema["properties"]), set(schema.get("required", []))


def _model_fields(model: type[BaseModel]) -> tuple[set[str], set[str]]:
    props = set(model.model_fields)
    required = {n for n, f in model.model_fields.items() if f.is_required()}
    # v and type have defaults in the models so code can omit them, but the wire always carries them
    required |= {n for n in ("v", "type") if n in props}
    return props, required


@pytest.mark.parametrize("name", sorted(ALL_FRAMES))
def test_frame_models_mirror_schemas(name: str) -> None:
    assert _model_fields(ALL_FRAMES[name]) == _schema_fields(load_schema(f"frames/{name}"), {})


@pytest.mark.parametrize(("model", "ref"), [
    (NpcSpec, "NpcSpec"), (GenerationOptions, "GenerationOptions"), (NpcState, "NpcState"),
    (Turn, "Turn"), (Choice, "Choice"), (NpcReply, None),
])
def test_shared_models_mirror_schemas(model: type[BaseModel], ref: str | None) -> None:
    schema = load_schema("npc_reply") if ref is None else load_schema("common")["$defs"][ref]
    assert _model_fields(model) == (set(schema["properties"]), set(schema.get("required", [])))


@pytest.mark.parametrize("bad", [
    {"v": 1, "type": "npc.say", "id": "x", "npc": "has space", "input": "hi"},
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi", "options": {"temperature": 9}},
    {"v": 1, "type": "npc.define", "id": "x", "npc": {"id": "a", "persona": "p", "actions": [], "emotions": ["e"]}},
    {"v": 1, "type": "npc.define", "id": "x",
     "npc": {"id": "a", "persona": "p", "actions": ["x", "x"], "emotions": ["e"]}},
    {"v": 1, "type": "hello", "id": "x", "token": "t"},
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi", "allowed_actions": []},
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi", "allowed_actions": ["a", "a"]},
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi", "allowed_actions": ["no spaces"]},
    {"v": 1, "type": "npc.define", "id": "x",
     "npc": {"id": "a", "persona": "p", "actions": [{"name": "x", "description": ""}], "emotions": ["e"]}},
    {"v": 1, "type": "npc.define", "id": "x",
     "npc": {"id": "a", "persona": "p", "actions": [{"name": "x", "description": "d" * 201}], "emotions": ["e"]}},
    {"v": 1, "type": "npc.define", "id": "x",
     "npc": {"id": "a", "persona": "p", "actions": [{"name": "x"}], "emotions": ["e"]}},
    {"v": 1, "type": "npc.define", "id": "x",
     "npc": {"id": "a", "persona": "p", "actions": [{"name": "x", "description": "d", "icon": "i"}],
             "emotions": ["e"]}},
    # JSON Schema's $ is the end of the text (Python's re also matched before a final newline)
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom\n", "input": "hi"},
    {"v": 1, "type": "hello", "id": "x", "token": "t", "protocol": 1, "game": "tavern\n"},
    # ids name files: only dots would leave the sessions folder
    {"v": 1, "type": "npc.say", "id": "x", "npc": "..", "input": "hi"},
    {"v": 1, "type": "hello", "id": "x", "token": "t", "protocol": 1, "game": "."},
])
def test_schemas_and_models_reject_the_same_bad_frames(bad: dict[str, Any]) -> None:
    assert first_error(f"frames/{bad['type']}", bad) is not None
    with pytest.raises(ValueError):
        TypeAdapter(ALL_FRAMES[bad["type"]]).validate_python(bad)


def test_validator_resolves_cross_file_refs() -> None:
    state = {"v": 1, "npc": {"id": "a", "persona": "p", "actions": ["x"], "emotions": ["e"]},
             "history": [{"player": "hi", "reply": {"say": "yo", "emotion": "e", "action": "x", "extra": 1}}]}
    frame = {"v": 1, "type": "npc.state.set", "id": "s", "state": state}
    assert not validator("frames/npc.state.set").is_valid(frame)
    del state["history"][0]["reply"]["extra"]
    assert validator("frames/npc.state.set").is_valid(frame)


def test_described_and_bare_labels_mix_and_only_the_model_sees_a_name_clash() -> None:
    """Names must be unique across both forms; JSON Schema cannot say so, the model (and so the daemon) does."""
    good = {"v": 1, "type": "npc.define", "id": "x", "npc": {
        "id": "a", "persona": "p", "actions": ["none", {"name": "trade", "description": "buy or sell goods"}],
        "emotions": [{"name": "calm", "description": "at ease"}]}}
    assert first_error("frames/npc.define", good) is None
    spec = TypeAdapter(ALL_FRAMES["npc.define"]).validate_python(good).npc
    assert spec.action_names == ["none", "trade"] and spec.emotion_names == ["calm"]
    clash = {**good, "npc": {**good["npc"], "actions": ["trade", {"name": "trade", "description": "d"}]}}
    assert first_error("frames/npc.define", clash) is None
    with pytest.raises(ValueError, match="declared more than once: trade"):
        TypeAdapter(ALL_FRAMES["npc.define"]).validate_python(clash)
