"""Corral: a secure runtime for AI agents."""

from corral.sdk import Agent, Context, Message, Result, capability, handler, memory, scheduled

__all__ = [
    "Agent",
    "Context",
    "Message",
    "Result",
    "Runtime",
    "capability",
    "handler",
    "memory",
    "scheduled",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The runtime pulls in the store, sandbox and supervisor; agent processes that only
    # import the SDK should not pay for that.
    if name == "Runtime":
        from corral.runtime.runtime import Runtime

        return Runtime
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
