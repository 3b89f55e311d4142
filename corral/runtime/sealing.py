"""Direct messages at rest for agents with ``encrypt: true``: sealed with the bus keyring.

A durable ``send`` is a row in the store until it is done, and its result stays after.
For an agent that asks for encryption, both are stored as AES-256-GCM ciphertext (a msgpack
extension value holding ``Sealed`` bytes), bound by the AAD to the agent, the task id and
which of the two it is, so a sealed payload copied onto another task does not open. The
plaintext only ever lives in memory. Keys rotate with ``corral keys rotate``; older keys
keep opening what they sealed.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from corral.bus.crypto import Keyring, Sealed
from corral.errors import MessageRejected

__all__ = ["SEALED_EXT", "PayloadSealer"]

#: msgpack extension type code of a sealed value in the store.
SEALED_EXT = 0x43  # "C"
_AAD = b"corral-task-at-rest-v1\0"
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder()

Part = Literal["payload", "result"]


class PayloadSealer:
    """Seal and open task payloads and results of encrypted agents."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring

    def seal(self, agent: str, task_id: str, part: Part, value: Any) -> msgspec.msgpack.Ext:
        """``value`` as ciphertext bound to this agent, task and part."""
        sealed = self.keyring.encrypt(_ENC.encode(value), _aad(agent, task_id, part))
        return msgspec.msgpack.Ext(SEALED_EXT, sealed.to_bytes())

    def open(self, agent: str, task_id: str, part: Part, value: Any) -> Any:
        """The plaintext of a sealed value; anything not sealed is returned as it is."""
        if not (isinstance(value, msgspec.msgpack.Ext) and value.code == SEALED_EXT):
            return value
        try:
            plain = self.keyring.decrypt(Sealed.from_bytes(value.data), _aad(agent, task_id, part))
        except MessageRejected as exc:
            raise MessageRejected(f"stored {part} of task {task_id} for {agent!r} does not "
                                  f"decrypt: {exc.message}", reason=exc.reason,
                                  hint="the store was tampered with, or the bus keyring "
                                       "(CORRAL_HOME/keys) is not the one that sealed it") from exc
        return _DEC.decode(plain)


def _aad(agent: str, task_id: str, part: str) -> bytes:
    return b"\0".join((_AAD, agent.encode(), task_id.encode(), part.encode()))
