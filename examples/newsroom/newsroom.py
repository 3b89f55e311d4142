"""A newsroom: agents that talk over topics instead of calling each other.

`reporter` files stories on `news.<desk>`; `editor` and `archive` subscribe (see
agents.yaml). Stories are published at-least-once with the story id as idempotency key,
so a crash redelivers and nothing is lost.
"""

from __future__ import annotations

from corral import Agent, Message, handler, memory


@Agent(name="reporter", version="1.0.0")
class Reporter:
    @handler
    async def file(self, msg: Message) -> dict:
        story = dict(msg.content or {})
        desk = story.get("desk", "general")
        self.ctx.publish(f"news.{desk}", story, guarantee="at-least-once",
                         idempotency_key=str(story.get("id", "")) or None)
        return {"filed": desk}


@Agent(name="editor", version="1.0.0")
class Editor:
    """Counts stories per desk (news.* : one level) and keeps the latest headline."""

    @memory(persistent=True)
    def desks(self) -> dict:
        return {}

    @handler
    async def edit(self, msg: Message) -> None:
        desk = msg.subject.split(".", 1)[1]
        entry = self.desks.setdefault(desk, {"stories": 0, "latest": ""})
        entry["stories"] += 1
        entry["latest"] = (msg.content or {}).get("headline", "")
        self.ctx.log(f"{desk}: {entry['latest']!r} from {msg.sender}")

    @handler
    async def desks_report(self, msg: Message) -> dict:
        return dict(self.desks)


@Agent(name="archive", version="1.0.0")
class Archive:
    """Keeps every story once (news.> : any depth), by id."""

    @memory(persistent=True)
    def stories(self) -> dict:
        return {}

    @handler
    async def store(self, msg: Message) -> None:
        story = msg.content or {}
        self.stories[str(story.get("id"))] = {"subject": msg.subject, **story}

    @handler
    async def count(self, msg: Message) -> int:
        return len(self.stories)
