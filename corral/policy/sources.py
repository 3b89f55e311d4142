"""Where policy text comes from: .cedar files and folders, and ``kind: Policy`` manifests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import PolicyInvalid
from corral.spec.policy import PolicyManifest

__all__ = ["MAX_FILE_SIZE", "PolicySource", "from_manifests", "problem", "raise_problems",
           "read_paths"]

#: Policy files larger than this are refused.
MAX_FILE_SIZE = 10 * 1024 * 1024
_SUFFIX = ".cedar"


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Cedar text and the name it is known by: a file path or "Policy/<ns>/<name>"."""

    name: str
    text: str


def problem(file: str, line: int | None, column: int | None, message: str) -> dict[str, Any]:
    """One entry of PolicyInvalid.problems; line and column are 1-based, None if unknown."""
    return {"file": file, "line": line, "column": column, "message": message}


def _where(p: dict[str, Any]) -> str:
    parts = [str(p["file"])] + [str(p[k]) for k in ("line", "column") if p.get(k) is not None]
    return ":".join(parts)


def raise_problems(problems: list[dict[str, Any]]) -> None:
    """Raise one PolicyInvalid listing every problem, if there are any."""
    if not problems:
        return
    files = sorted({str(p["file"]) for p in problems})
    lines = [f"{len(problems)} problem(s) in {', '.join(files)}; nothing was loaded and the "
             "policies in force are unchanged:"]
    lines += [f"  {_where(p)}: {p['message']}" for p in problems]
    raise PolicyInvalid("\n".join(lines), problems=problems)


def _read(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_SIZE + 1)
    if len(data) > MAX_FILE_SIZE:
        raise ValueError(f"file is larger than {MAX_FILE_SIZE // (1024 * 1024)} MiB; split it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 at byte {exc.start}; save the file as UTF-8") from None


def _files(raw: str) -> list[str]:
    if not os.path.isdir(raw):
        return [raw]
    found = []
    for folder, dirs, names in os.walk(raw):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, n) for n in names if n.endswith(_SUFFIX)]
    return sorted(found)


def read_paths(paths: Sequence[str | Path] | str | Path) -> list[PolicySource]:
    """Sources from .cedar files and folders (*.cedar below, sorted); PolicyInvalid on problems."""
    if isinstance(paths, str | Path):
        paths = [paths]
    sources: list[PolicySource] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for raw in (os.fspath(p) for p in paths):
        if not os.path.exists(raw):
            problems.append(problem(raw, None, None, "no such file or folder; give a .cedar "
                                                     "file or a folder of them"))
            continue
        for path in _files(raw):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            try:
                sources.append(PolicySource(path, _read(path)))
            except OSError as exc:
                problems.append(problem(path, None, None, f"can't read the file: "
                                                          f"{exc.strerror or exc}; check it "
                                                          "exists and is readable"))
            except ValueError as exc:
                problems.append(problem(path, None, None, str(exc)))
    raise_problems(problems)
    return sources


def from_manifests(manifests: Iterable[PolicyManifest]) -> list[PolicySource]:
    """Sources from ``kind: Policy`` manifests, reading spec.file where given."""
    sources: list[PolicySource] = []
    problems: list[dict[str, Any]] = []
    for m in manifests:
        name = m.source_name
        if m.file_path is None:
            sources.append(PolicySource(name, m.spec.policy or ""))
            continue
        try:
            sources.append(PolicySource(name, _read(m.file_path)))
        except OSError as exc:
            where = f" (spec.file of {m.source})" if m.source else ""
            problems.append(problem(name, None, None, f"can't read the file{where}: "
                                                      f"{exc.strerror or exc}; spec.file is "
                                                      "relative to the manifest's folder"))
        except ValueError as exc:
            problems.append(problem(name, None, None, str(exc)))
    raise_problems(problems)
    return sources
