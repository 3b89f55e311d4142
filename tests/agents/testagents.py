"""Agents the integration tests run, one behaviour each."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

from corral import Agent, Message, Result, handler, memory, scheduled


@Agent(name="echo")
class Echo:
    @handler
    async def echo(self, msg: Message) -> dict:
        return {"echo": msg.content, "pid": os.getpid(), "sender": msg.sender}

    @handler
    async def boom(self, msg: Message) -> None:
        raise ValueError(f"bad input: {msg.content!r}")

    @handler
    async def refuse(self, msg: Message) -> Result:
        return Result.failure("not today", error_type="Refused")

    @handler
    async def crash(self, msg: Message) -> None:
        os._exit(3)

    @handler
    async def nap(self, msg: Message) -> str:
        await asyncio.sleep(float(msg.content))
        return "rested"

    @handler
    def block(self, msg: Message) -> str:
        time.sleep(float(msg.content))  # blocks the worker's event loop: no heartbeats
        return "woke"

    @handler
    async def hog(self, msg: Message) -> int:
        chunks = []
        for _ in range(int(msg.content)):
            chunk = bytearray(1 << 20)
            chunk[::4096] = b"x" * len(chunk[::4096])  # touch every page
            chunks.append(chunk)
        return len(chunks)


@Agent(name="counter")
class Counter:
    @memory(persistent=True)
    def state(self) -> dict:
        return {"n": 0, "ticks": 0}

    @handler
    async def incr(self, msg: Message) -> int:
        self.state["n"] += 1
        return self.state["n"]

    @handler
    async def get(self, msg: Message) -> dict:
        return dict(self.state)

    @handler
    async def crash(self, msg: Message) -> None:
        os._exit(3)

    @scheduled(interval=timedelta(milliseconds=100))
    async def tick(self) -> None:
        self.state["ticks"] += 1


@Agent(name="initfail")
class InitFail:
    async def on_start(self) -> None:
        raise RuntimeError("cannot start: missing config")

    @handler
    async def echo(self, msg: Message) -> object:
        return msg.content


@Agent(name="caller")
class Caller:
    @handler
    async def relay(self, msg: Message) -> dict:
        answer = await self.ctx.request("echo", msg.content, handler="echo")
        return {"relayed": answer["echo"], "via": self.ctx.agent}

    @handler
    async def notify(self, msg: Message) -> str:
        self.ctx.send("counter", None, handler="incr")
        return "sent"


@Agent(name="order")
class Order:
    @memory
    def seen(self) -> list:
        return []

    @handler
    async def record(self, msg: Message) -> list:
        await asyncio.sleep(0.3 if msg.content == "first" else 0.01)  # "first" holds the slot
        self.seen.append(msg.content)
        return list(self.seen)


@Agent(name="listener")
class Listener:
    """Records what its subscriptions deliver; crashes or fails on request."""

    @memory(persistent=True)
    def got(self) -> dict:
        return {"items": []}

    @handler
    async def on_news(self, msg: Message) -> None:
        if msg.content == "crash" and self.ctx.restarts == 0:
            os._exit(9)  # dies mid-delivery, before acknowledging
        if msg.content == "poison":
            raise ValueError("cannot digest poison")
        self.got["items"].append({"subject": msg.subject, "sender": msg.sender,
                                  "content": msg.content, "kind": msg.kind})

    @handler
    async def items(self, msg: Message) -> list:
        return list(self.got["items"])

    @handler
    async def join(self, msg: Message) -> str:
        self.ctx.subscribe(msg.content, handler="on_news")
        return "joined"

    @handler
    async def leave(self, msg: Message) -> str:
        self.ctx.unsubscribe(msg.content)
        return "left"

    @handler
    async def shout(self, msg: Message) -> str:
        self.ctx.publish("news.shout", msg.content, guarantee="at-least-once")
        return "published"


@Agent(name="announcer")
class Announcer:
    @handler
    async def announce(self, msg: Message) -> str:
        self.ctx.broadcast(msg.content, handler="on_news", selector="team=nlp")
        return "announced"

    @handler
    async def flood(self, msg: Message) -> dict:
        outcomes: dict = {}
        for _ in range(int(msg.content)):
            try:
                await self.ctx.request("echo", "hi", handler="echo")
                kind = "ok"
            except Exception as exc:  # the runtime's refusal comes back as the request's error
                kind = type(exc).__name__ + ":" + getattr(exc, "message", str(exc))[:40]
            outcomes[kind] = outcomes.get(kind, 0) + 1
        return outcomes

    @handler
    async def big(self, msg: Message) -> str:
        try:
            await self.ctx.request("echo", "x" * int(msg.content), handler="echo")
        except Exception as exc:
            return type(exc).__name__ + ": " + str(exc)
        return "sent"
