"""The protocol's JSON Schemas, shipped in the wheel as the package ``zyke.schemas``.

This folder is the one source of truth: the daemon validates frames with it, the pydantic models
mirror it (tests/test_schemas.py proves they agree), and tools/gen_bridge_constants.py derives the
Godot and Unity constants from it.
"""
