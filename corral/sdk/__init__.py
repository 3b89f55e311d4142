"""What agent authors import: Agent, handler, memory, capability, scheduled, Message, Result."""

from corral.sdk.context import Context
from corral.sdk.decorators import Agent, capability, handler, memory, scheduled
from corral.sdk.message import Message, Result

__all__ = ["Agent", "Context", "Message", "Result", "capability", "handler", "memory", "scheduled"]
