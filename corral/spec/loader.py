"""Load manifests from YAML files, folders or text; all problems become one SpecError.

Nothing is returned partially: either every document of every file is valid (and the
set is consistent), or one :class:`~corral.errors.SpecError` lists every problem, each
with the file, the field path, what it got and what it expects.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
import types
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from corral.errors import SpecError
from corral.spec.models import KINDS, AgentManifest, FieldProblem, Manifest
from corral.spec.policy import PolicyManifest

KINDS.setdefault("Policy", PolicyManifest)  # models.py can't import it: policy.py imports models

__all__ = ["MAX_FILE_SIZE", "load_paths", "load_text", "validate_set"]

#: Files larger than this are refused.
MAX_FILE_SIZE = 10 * 1024 * 1024
_MAX_NODES = 200_000  # values in one document, counting each use of a YAML alias
_MAX_DEPTH = 100
_YAML_SUFFIXES = (".yaml", ".yml")
_TOP_EXPECTED = "a mapping with apiVersion, kind, metadata and spec"
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_MERGE_TAG = "tag:yaml.org,2002:merge"


# -- showing values ------------------------------------------------------------------------


class _Shown:
    """Stands in for a big or odd value in SpecError.got: its repr is a short summary."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxstring, _repr.maxother = 3, 6, 6, 80, 80


def _shown(value: Any) -> Any:
    """The value itself if it is small and plain, else a _Shown with a bounded repr."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 256 else _Shown(f"<{value.bit_length()}-bit integer>")
    if isinstance(value, str) and len(value) <= 200:
        return value
    try:
        text = _repr.repr(value)
        # Small plain lists and mappings (nothing cut short) are kept as they are.
        return value if isinstance(value, list | dict) and "..." not in text else _Shown(text)
    except Exception:
        return _Shown(f"<{type(value).__name__}>")


# -- YAML ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line_col(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _yaml_problem(exc: yaml.YAMLError, text: str, source: str) -> SpecError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        message = f"{where}{problem}{context}"
    elif isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = char if isinstance(char, int) else ord(char[:1] or "\0")
        message = f"{_line_col(text, exc.position)}: character #x{code:04x} is not allowed in YAML"
    else:
        message = str(exc) or type(exc).__name__
    return SpecError(message, file=source, expected="valid YAML")


def _parse(text: str, source: str) -> tuple[list[Any], SpecError | None]:
    """The documents of a YAML text (empty ones as None) up to the first YAML error, if any."""
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            docs.append(doc)
    except yaml.YAMLError as exc:
        return docs, _yaml_problem(exc, text, source)
    except RecursionError:
        return docs, SpecError("YAML is nested too deeply", file=source,
                               expected=f"at most {_MAX_DEPTH} levels")
    except Exception as exc:  # e.g. int() refusing a 5000-digit number
        return docs, SpecError(f"YAML could not be read: {exc}", file=source,
                               expected="valid YAML")
    return docs, None


# -- plain-data check ----------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _KEY_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _check_plain(doc: Any, source: str) -> SpecError | None:
    """Refuse what JSON can't hold (dates, sets, binary, NaN, non-string keys) and bombs."""
    stack: list[tuple[Any, str, int]] = [(doc, "", 0)]
    count = 0
    while stack:
        value, path, depth = stack.pop()
        count += 1
        if count > _MAX_NODES:
            return SpecError("document is too large", file=source,
                             expected=f"at most {_MAX_NODES} values (each use of a YAML alias "
                                      "counts)")
        if depth > _MAX_DEPTH:
            return SpecError("nested too deeply", file=source, path=path or None,
                             expected=f"at most {_MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                if not isinstance(key, str):
                    return SpecError("mapping key is not a string", file=source,
                                     path=path or None, got=_shown(key),
                                     expected="a string key (quote keys like on, yes, 1 or "
                                              "dates)")
                stack.append((item, _join(path, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, _join(path, i), depth + 1)
                         for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, float):
            if not math.isfinite(value):
                return SpecError("not a finite number", file=source, path=path or None,
                                 got=value, expected="a finite number")
        elif value is not None and not isinstance(value, str | int):
            return SpecError(f"unsupported YAML value of type {type(value).__name__}",
                             file=source, path=path or None, got=_shown(value),
                             expected="a string, number, boolean, null, list or mapping "
                                      "(quote dates and timestamps)")
    return None


# -- pydantic errors -> SpecErrors ---------------------------------------------------------


def _strip(tp: Any) -> Any:
    """Unwrap Annotated[...] and Optional[...] down to the inner type."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            inner = [a for a in get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp
            tp = inner[0]
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _field_type(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.annotation
    return None


def _type_at(root: type[BaseModel], loc: Sequence[str | int]) -> Any:
    """The declared type at a location, or None if the location leaves the schema."""
    tp: Any = root
    for item in loc:
        tp = _strip(tp)
        if _is_model(tp) and isinstance(item, str):
            tp = _field_type(tp, item)
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            return None
        if tp is None:
            return None
    return _strip(tp)


def _aliases(model: Any) -> list[str]:
    if not _is_model(model):
        return []
    return [info.alias or name for name, info in model.model_fields.items()]


def _describe(tp: Any) -> str:
    """What a missing field should hold, in words."""
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if _is_model(tp):
        required = [info.alias or name for name, info in tp.model_fields.items()
                    if info.is_required()]
        return "a mapping" + (f" with {', '.join(required)}" if required else "")
    return {str: "a string", list: "a list", dict: "a mapping", int: "an integer",
            float: "a number"}.get(get_origin(tp) or tp, "a value")


_EXPECTED_BY_TYPE = {
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
}


_BOUNDS = {
    "greater_than": "more than {gt}",
    "greater_than_equal": "at least {ge}",
    "less_than": "less than {lt}",
    "less_than_equal": "at most {le}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
    "string_too_short": "at least {min_length} character(s)",
    "string_too_long": "at most {max_length} character(s)",
}


def _path(loc: Sequence[str | int]) -> str:
    path = ""
    for item in loc:
        path = _join(path, item)
    return path


def _problem(err: ErrorDetails, model: type[BaseModel], source: str) -> SpecError:
    loc = [item for item in err["loc"] if item != "[key]"]
    kind = err["type"]
    got: Any = err.get("input")
    ctx = err.get("ctx") or {}
    message = "invalid value"
    expected: str | None
    path = _path(loc)
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        known = _aliases(_type_at(model, loc[:-1]))
        close = difflib.get_close_matches(key, known, n=1)
        message = f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        expected = f"one of: {', '.join(known)}" if known else "no extra fields"
    elif kind == "missing":
        got = None
        message = f"missing required field {str(loc[-1])!r}" if loc else "missing value"
        expected = _describe(_type_at(model, loc))
    elif kind == "value_error" and isinstance(ctx.get("error"), FieldProblem):
        problem: FieldProblem = ctx["error"]
        message, expected, got = str(problem), problem.expected, problem.got
        if problem.field:
            path = f"{path}.{problem.field}" if path else problem.field
    elif kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error") or err["msg"])
        if text.startswith("expected "):
            expected = text.removeprefix("expected ")
        else:
            message, expected = text, None
    elif kind == "literal_error":
        options = str(ctx.get("expected", ""))
        expected = f"one of {options}" if " or " in options else options
    elif kind in _BOUNDS:
        try:
            expected = _BOUNDS[kind].format(**ctx)
        except (KeyError, IndexError, ValueError):
            expected = err["msg"]
    elif kind in _EXPECTED_BY_TYPE:
        expected = _EXPECTED_BY_TYPE[kind]
    else:
        expected = err["msg"].removeprefix("Input should be ")
    return SpecError(message, file=source, path=path or None, got=_shown(got),
                     expected=expected)


# -- documents -----------------------------------------------------------------------------


def _validate(doc: Any, source: str, base_dir: str) -> tuple[Manifest | None, list[SpecError]]:
    """One document into a manifest, or the problems with it."""
    plain = _check_plain(doc, source)
    if plain is not None:
        return None, [plain]
    if not isinstance(doc, dict):
        return None, [SpecError("a manifest must be a mapping", file=source,
                                got=_shown(doc), expected=_TOP_EXPECTED)]
    kinds = ", ".join(KINDS)
    kind = doc.get("kind")
    if kind is None or not isinstance(kind, str) or kind not in KINDS:
        problems = []
        version = doc.get("apiVersion")
        if version != "corral/v1":
            problems.append(SpecError(
                "missing required field 'apiVersion'" if version is None else "invalid value",
                file=source, path="apiVersion", got=_shown(version), expected="'corral/v1'"))
        message = ("missing required field 'kind'" if kind is None
                   else f"kind {_shown(kind)!r} is not supported")
        problems.append(SpecError(message, file=source, path="kind", got=_shown(kind),
                                  expected=f"one of: {kinds}"))
        return None, problems
    model = KINDS[kind]
    try:
        manifest = model.model_validate(doc)
    except ValidationError as exc:
        return None, [_problem(err, model, source) for err in exc.errors(include_url=False)]
    return manifest.with_origin(source, base_dir), []


def _load_documents(text: str, source: str, base_dir: str) -> tuple[list[Manifest],
                                                                      list[SpecError]]:
    docs, broken = _parse(text, source)
    numbered = [(i, doc) for i, doc in enumerate(docs, start=1) if doc is not None]
    many = len(numbered) + (broken is not None) > 1
    manifests: list[Manifest] = []
    problems: list[SpecError] = []
    for number, doc in numbered:
        where = f"{source}#{number}" if many else source
        try:
            manifest, found = _validate(doc, where, base_dir)
        except Exception as exc:  # a last line of defence: report, never crash
            manifest, found = None, [SpecError(f"could not validate: {type(exc).__name__}: "
                                               f"{exc}", file=where, expected=_TOP_EXPECTED)]
        problems += found
        if manifest is not None:
            manifests.append(manifest)
    if broken is not None:
        problems.append(broken)  # its line and column locate it in the file
    return manifests, problems


def validate_set(manifests: Sequence[Manifest]) -> list[SpecError]:
    """Problems between manifests: duplicate namespace/name, mixed restart strategies."""
    problems: list[SpecError] = []
    seen: dict[tuple[str, str], Manifest] = {}
    groups: dict[tuple[str, str], AgentManifest] = {}
    for m in manifests:
        first = seen.setdefault((m.kind, m.key), m)
        if first is not m:
            problems.append(SpecError(
                f"duplicate {m.kind} {m.key!r}, also defined in {first.source or '<unknown>'}",
                file=m.source or None, path="metadata.name", got=m.name,
                expected="each namespace/name once in the set"))
        if isinstance(m, AgentManifest) and m.spec.restart.group is not None:
            group = m.spec.restart.group
            leader = groups.setdefault((m.namespace, group), m)
            want = leader.spec.restart.strategy
            if m.spec.restart.strategy != want:
                problems.append(SpecError(
                    f"restart group {group!r} mixes strategies; agent {leader.key!r} "
                    f"in {leader.source or '<unknown>'} uses {want!r}",
                    file=m.source or None, path="spec.restart.strategy",
                    got=m.spec.restart.strategy, expected=f"{want!r} like the rest of the group"))
    return problems


def _fail(problems: list[SpecError]) -> SpecError:
    files = sorted({p.file for p in problems if p.file})
    where = f" in {', '.join(files)}" if files else ""
    return SpecError(f"{len(problems)} problem(s){where}; nothing was applied",
                     problems=problems)


def _finish(manifests: list[Manifest], problems: list[SpecError]) -> list[AgentManifest]:
    problems = problems + validate_set(manifests)
    if problems:
        raise _fail(problems)
    # Only kind Agent exists today; widen the return type when Policy and Twin land.
    return cast(list[AgentManifest], manifests)


# -- public --------------------------------------------------------------------------------


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError(f"not valid UTF-8 at byte {exc.start}", file=source,
                        expected="UTF-8 text") from None


def load_text(text: str | bytes, source: str = "<stdin>",
              base_dir: str = ".") -> list[AgentManifest]:
    """Manifests from YAML text (one or more documents); raises one SpecError on problems."""
    base = os.path.abspath(base_dir)
    try:
        if isinstance(text, bytes | bytearray):
            text = _decode(bytes(text), source)
        if not isinstance(text, str):
            raise SpecError("not YAML text", file=source, got=_shown(text),
                            expected="a str or bytes of YAML")
    except SpecError as exc:
        raise _fail([exc]) from None
    manifests, problems = _load_documents(text, source, base)
    return _finish(manifests, problems)


def _files(paths: Sequence[str | Path], problems: list[SpecError]) -> Iterator[tuple[str, str]]:
    """(shown path, absolute path) of every YAML file named or found below a folder."""
    seen: set[str] = set()
    for raw in paths:
        try:
            shown = os.fspath(raw)
        except TypeError:
            problems.append(SpecError("not a path", got=_shown(raw), expected="a str or Path"))
            continue
        if isinstance(shown, bytes):
            shown = os.fsdecode(shown)
        if os.path.isdir(shown):
            found = []
            for folder, dirs, names in os.walk(shown):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(folder, n) for n in names
                          if n.endswith(_YAML_SUFFIXES)]
            candidates = sorted(found)
        elif os.path.exists(shown):
            candidates = [shown]
        else:
            problems.append(SpecError("no such file or directory", file=shown,
                                      expected="an existing YAML file or folder"))
            continue
        for path in candidates:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                yield path, os.path.abspath(path)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise SpecError(f"can't read the file: {exc.strerror or exc}", file=path,
                        expected="a readable YAML file") from None
    if len(data) > MAX_FILE_SIZE:
        raise SpecError("file is too large", file=path,
                        expected=f"at most {MAX_FILE_SIZE // (1024 * 1024)} MiB of YAML")
    return _decode(data, path)


def load_paths(paths: Sequence[str | Path]) -> list[AgentManifest]:
    """Manifests from files and folders (*.yaml, *.yml below, sorted); one SpecError on problems."""
    if isinstance(paths, str | Path):
        paths = [paths]
    manifests: list[Manifest] = []
    problems: list[SpecError] = []
    for shown, absolute in _files(paths, problems):
        try:
            text = _read(absolute)
        except SpecError as exc:
            exc.file = shown
            problems.append(exc)
            continue
        found, bad = _load_documents(text, shown, os.path.dirname(absolute))
        manifests += found
        problems += bad
    return _finish(manifests, problems)
