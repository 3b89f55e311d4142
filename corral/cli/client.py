"""A small blocking client for the control socket, used by the CLI (one connection per call)."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import msgspec

from corral.errors import ControlError, CorralError, RuntimeNotRunning, error_from_info

__all__ = ["MAX_LINE", "Client", "error_from_wire"]

#: The longest answer line accepted (the server refuses requests over the same size).
MAX_LINE = 16 * 1024 * 1024

_ids = itertools.count(1)


def error_from_wire(info: dict[str, Any]) -> CorralError:
    """Rebuild the error of an ``ok: false`` answer; ``.details`` keeps the wire form."""
    kind, message, hint = info.get("type", ""), info.get("message", ""), info.get("hint") or ""
    err = error_from_info(kind, message, hint=hint, agent=info.get("agent"))
    err.details = info  # type: ignore[attr-defined]
    return err


class Client:
    """Talks to one runtime's control socket; errors come back as CorralErrors."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(socket_path)
        self.timeout = timeout

    def call(self, op: str, /, **args: Any) -> Any:
        """Run one op and return its result; raises the runtime's error."""
        # Ops that wait (request, apply --wait) get their own timeout on top of ours.
        wait = self.timeout + float(args.get("timeout") or 0)
        with self._connect() as sock:
            self._send(sock, op, args)
            sock.settimeout(wait)
            msg = next(_lines(sock, self.path, wait), None)
        if msg is None:
            raise _hung_up(self.path)
        return _result(msg)

    def stream(self, op: str, /, **args: Any) -> Generator[Any, None, Any]:
        """Yield an op's stream items (``logs`` with follow) until it ends; returns its result."""
        with self._connect() as sock:
            self._send(sock, op, args)
            sock.settimeout(None)  # a follow lasts until the user stops it
            for msg in _lines(sock, self.path, None):
                if "stream" in msg:
                    yield msg["stream"]
                else:
                    return _result(msg)
        raise _hung_up(self.path)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise RuntimeNotRunning(f"no Corral runtime is listening on {self.path}") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on {self.path}",
                               hint="the socket belongs to the user who runs the runtime") from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"can't connect to {self.path}: {exc.strerror or exc}",
                               hint="check --home / CORRAL_HOME") from exc
        return sock

    def _send(self, sock: socket.socket, op: str, args: dict[str, Any]) -> None:
        line = msgspec.json.encode({"id": next(_ids), "op": op, "args": args}) + b"\n"
        try:
            sock.sendall(line)
        except TimeoutError:
            raise ControlError(f"the runtime did not take the request within {self.timeout:g}s",
                               hint="it may be overloaded or hung; check its log") from None
        except OSError:
            pass  # it hung up on us; its answer (e.g. "line too long") may still be there


def _lines(sock: socket.socket, path: Path, wait: float | None) -> Iterator[dict[str, Any]]:
    """The answer lines on ``sock``, decoded, until the runtime hangs up."""
    buf = bytearray()
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line, buf = bytes(buf[:nl]), buf[nl + 1:]
            if line.strip():
                msg = msgspec.json.decode(line)
                if not isinstance(msg, dict):
                    raise ControlError(f"unexpected answer from the runtime: {line[:200]!r}")
                yield msg
            continue
        if len(buf) > MAX_LINE:
            raise ControlError(f"answer line from the runtime is over {MAX_LINE} bytes")
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            raise ControlError(f"no answer from the runtime within {wait:g}s",
                               hint=f"it may be busy or hung; its socket is {path}") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return
        buf += chunk


def _hung_up(path: Path) -> ControlError:
    return ControlError(f"the runtime at {path} closed the connection without an answer",
                        hint="it may be shutting down or have crashed; check its log")


def _result(msg: dict[str, Any]) -> Any:
    if msg.get("ok"):
        return msg.get("result")
    info = msg.get("error")
    if not isinstance(info, dict):
        raise ControlError(f"unexpected answer from the runtime: {msg!r:.200}")
    raise error_from_wire(info)
