"""The asyncio SDK against a real daemon over loopback (plain asyncio.run: no async test plugin needed)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import game_name
from daemon_proc import DaemonProcess
from zyke import AsyncClient, AsyncNpc, Cancelled, NpcResponse, UnknownAction, ZykeTimeout

LONG_LINE = "Tell me the whole long story of your forge, every detail, from the very beginning."


async def define(client: AsyncClient, npc_id: str = "brom") -> AsyncNpc:
    return await client.npc(npc_id, persona="A grumpy dwarf blacksmith who loves his forge.",
                            actions=["none", "trade", "repair", "attack"], emotions=["neutral", "angry", "pleased"])


def assert_valid(reply: NpcResponse, npc: AsyncNpc) -> None:
    assert isinstance(reply, NpcResponse)
    assert reply.npc == npc.id
    assert reply.action in npc.actions
    assert reply.emotion in npc.emotions


@pytest.mark.slow
def test_async_say_stream_and_concurrency(daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.url, daemon.token, game=game_name(request), timeout=300) as client:
            brom = await define(client)
            mira = await client.npc("mira", persona="A cheerful elf innkeeper.", actions=["none", "serve"],
                                    emotions=["happy", "curious"], options={"max_tokens": 16})
            reply = await brom.say("Can you fix my sword?", state={"gold": 12}, max_tokens=24)
            assert_valid(reply, brom)

            pieces = []
            stream = brom.stream("And how much?", max_tokens=24)
            async for piece in stream:
                pieces.append(piece)
            assert stream.response is not None
            assert "".join(pieces) == stream.response.say
            assert_valid(stream.response, brom)

            # two NPCs at once on one connection; each answer reaches its own caller
            a, b = await asyncio.gather(brom.say("Hello Brom", max_tokens=16), mira.say("Hello Mira"))
            assert_valid(a, brom)
            assert_valid(b, mira)
            assert b.usage.completion_tokens <= 16  # the NPC's default options applied

            assert [t["player"] for t in (await brom.save())["history"]] == [
                "Can you fix my sword?", "And how much?", "Hello Brom"]

    asyncio.run(main())


@pytest.mark.slow
def test_async_cancel_timeout_and_reuse(daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.url, daemon.token, game=game_name(request), timeout=300) as client:
            brom = await define(client)

            async with brom.stream(LONG_LINE, max_tokens=400) as stream:
                await stream.__anext__()
                await stream.cancel()
                with pytest.raises(Cancelled):
                    async for _ in stream:
                        pass

            # cancelling the awaiting task cancels the line on the daemon
            task = asyncio.create_task(brom.say(LONG_LINE, max_tokens=400))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            with pytest.raises(ZykeTimeout):
                await brom.say(LONG_LINE, max_tokens=400, timeout=0.01)

            assert_valid(await brom.say("Good day.", max_tokens=16), brom)
            assert [t["player"] for t in (await brom.save())["history"]] == ["Good day."]

    asyncio.run(main())


@pytest.mark.slow
def test_async_allowed_actions_and_unknown_action(daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.url, daemon.token, game=game_name(request), timeout=300) as client:
            brom = await client.npc("brom", persona="A grumpy dwarf blacksmith who loves his forge.",
                                    actions=["none", {"name": "repair", "description": "mend the player's gear"},
                                             "attack"], emotions=["neutral", "angry"])
            assert brom.actions == ["none", "repair", "attack"]
            reply = await brom.say("Fix my sword or else!", allowed_actions=["none"], max_tokens=24)
            assert_valid(reply, brom)
            assert reply.action == "none"
            stream = brom.stream("I said fix it!", allowed_actions=["attack"], max_tokens=24)
            async for _ in stream:
                pass
            assert stream.response is not None and stream.response.action == "attack"
            with pytest.raises(UnknownAction) as info:
                await brom.say("Hello?", allowed_actions=["dance"], max_tokens=16)
            assert info.value.code == "unknown_action" and "dance" in info.value.message
            assert_valid(await brom.say("Hello?", max_tokens=16), brom)

    asyncio.run(main())


def test_async_say_and_stream_reject_unknown_keywords(daemon: DaemonProcess, request: pytest.FixtureRequest) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.url, daemon.token, game=game_name(request), timeout=300) as client:
            brom = await define(client)
            with pytest.raises(TypeError, match=r"AsyncNpc\.stream\(\) got an unexpected keyword argument 'tmp'"):
                brom.stream("Hi", tmp=0.5)  # type: ignore[call-arg]
            with pytest.raises(TypeError, match=r"AsyncNpc\.say\(\) got an unexpected keyword argument 'tmp'"):
                await brom.say("Hi", tmp=0.5)  # type: ignore[call-arg]
            assert (await brom.save()).get("history", []) == []

    asyncio.run(main())
