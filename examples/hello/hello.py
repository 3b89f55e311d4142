"""The smallest Corral agent: greets, counts greetings in persistent memory."""

from corral import Agent, Message, Result, handler, memory


@Agent(name="hello", version="1.0.0")
class Hello:
    @memory(persistent=True)
    def greeted(self) -> dict:
        return {"count": 0}

    @handler
    async def greet(self, msg: Message) -> Result:
        name = (msg.content or {}).get("name", "world")
        self.greeted["count"] += 1
        return Result.success({"greeting": f"hello, {name}!", "count": self.greeted["count"]})
