"""A two-agent pipeline: `ingest` cleans text and asks `summarizer` for a summary."""

from __future__ import annotations

import re

from corral import Agent, Message, Result, handler, memory


@Agent(name="summarizer", version="1.0.0")
class Summarizer:
    """Summarises text: its first sentence and some counts."""

    @handler
    async def summarize(self, msg: Message) -> Result:
        text = (msg.content or {}).get("text", "")
        if not text.strip():
            return Result.failure("no text to summarize", error_type="ValueError")
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        return Result.success({"summary": sentences[0], "sentences": len(sentences),
                               "words": len(text.split())})


@Agent(name="ingest", version="1.0.0")
class Ingest:
    """Normalises incoming text, gets it summarised, and keeps a tally that survives restarts."""

    @memory(persistent=True)
    def tally(self) -> dict:
        return {"documents": 0, "words": 0}

    @handler
    async def ingest(self, msg: Message) -> Result:
        text = " ".join(str((msg.content or {}).get("text", "")).split())
        summary = await self.ctx.request("summarizer", {"text": text}, handler="summarize",
                                         timeout=10)
        self.tally["documents"] += 1
        self.tally["words"] += summary["words"]
        self.ctx.log(f"ingested document {self.tally['documents']} ({summary['words']} words)")
        return Result.success({**summary, "tally": dict(self.tally)})
