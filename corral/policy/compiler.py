"""Turn policy sources into one validated, pre-parsed Cedar policy set, or one PolicyInvalid.

Every policy is validated against the schema before anything is built, and every problem
is reported with its file, line and column (see :mod:`corral.policy._syntax` for how they
are found, since cedarpy gives none). Nothing is partial: either the whole set compiles or
:class:`~corral.errors.PolicyInvalid` lists every problem.

Validating is the slow step (about 100 µs a policy in Cedar), so callers pass the texts
they already know to be valid (``known_valid``) and only new or changed policies are
validated again; the schema never changes under a running engine, and Cedar validates each
policy on its own. Many new policies are validated on several threads, as cedarpy releases
the GIL while it validates.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from collections.abc import Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cedarpy

from corral.errors import PolicyInvalid
from corral.policy._schema import ACTIONS, ATTRIBUTES, ENTITY_TYPES, HAS_ATTRIBUTE, schema
from corral.policy._syntax import LineIndex, Piece, locate_parse_error, locate_problem, split
from corral.policy._syntax import tokens as cedar_tokens
from corral.policy.sources import PolicySource, problem, raise_problems

__all__ = ["DEFAULT_ALLOW_ID", "CompiledPolicies", "PolicyInfo", "compile_policies"]

#: The id of the permit-all policy that non-strict mode adds after every loaded policy.
DEFAULT_ALLOW_ID = "corral.default-allow"
_DEFAULT_ALLOW = f'@id("{DEFAULT_ALLOW_ID}")\npermit (principal, action, resource);'
_BUILTIN = "<built-in: non-strict mode>"

_PARALLEL_FROM = 200  # fewer new policies than this are validated on the calling thread
_MAX_THREADS = 4
_POLICY_PREFIX = re.compile(r"^for policy `[^`]*`, ")
_VARYING = re.compile(r'(on entity type |for )(`[^`]+`|Action::"(?:[^"\\]|\\.)*")')
_ADVICE = (
    ("safety of access to tag", "check the tag first, like "
                                "`principal.hasTag(\"tier\") && principal.getTag(\"tier\") == …`"),
    ("safety of access to optional attribute", "check the field first, like "
                                               "`context has cpuMillis && context.cpuMillis …`"),
    ("unexpected end of input", "every policy ends with `;`, so look for a missing `;`, `)` "
                                "or `}`"),
    ("unable to find an applicable action", "no action in the schema takes these principal and "
                                            "resource types; see docs/policy.md for the actions"),
    ("in context for", "only some actions carry this context field; limit the policy to them "
                       "with `action == Action::\"…\"` (docs/policy.md lists them)"),
)


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One loaded policy: its id, where it was written, its effect and its text."""

    id: str  # the @id("...") annotation, else "<source>:<line>"
    source: str
    line: int
    column: int
    effect: str  # "permit" or "forbid"
    text: str


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    """A validated policy set, parsed once, with Cedar's positional ids mapped to Corral's."""

    policy_set: cedarpy.PolicySet
    infos: tuple[PolicyInfo, ...]
    #: Cedar's positional id ("policy3") -> the policy's id.
    ids: Mapping[str, str]
    #: The text of every loaded policy; all are valid against the schema.
    texts: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Entry:
    source: str
    index: LineIndex
    piece: Piece

    def position(self, offset: int = 0) -> tuple[int, int]:
        return self.index.position(self.piece.start + offset)

    def problem(self, message: str, offset: int = 0) -> dict[str, Any]:
        line, column = self.position(offset)
        return problem(self.source, line, column, message)

    @property
    def id(self) -> str:
        if self.piece.annotation_id:
            return self.piece.annotation_id
        return f"{self.source}:{self.position()[0]}"


def _advice(message: str) -> str:
    """What to do next, for messages that do not say it themselves."""
    missing = re.match(r"attribute `(\w+)` on entity type `\w+` not found", message)
    if missing and missing.group(1) in HAS_ATTRIBUTE:
        name = missing.group(1)
        owners = HAS_ATTRIBUTE[name]
        return (f"; {name!r} is an attribute of {', '.join(owners)} only: limit the scope "
                f"with `principal is {owners[0]}` (or `resource is …`), or test "
                f"`has {name}` first")
    if any(word in message for word in ("not found", "unrecognized", "not declared")):
        for name in re.findall(r"`([^`]+)`", message):
            action = re.fullmatch(r'Action::"(.*)"', name)
            word = action.group(1) if action else name
            known = ACTIONS if action else ATTRIBUTES + ENTITY_TYPES
            close = difflib.get_close_matches(word, known, n=1, cutoff=0.7)
            if close and close[0] != word:
                return f" (did you mean {close[0]!r}?)"
    for needle, advice in _ADVICE:
        if needle in message:
            return f"; {advice}"
    return ""


def _parse_error(text: str) -> str | None:
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return str(exc)
    return None


def _parse_problems(batch: Sequence[_Entry]) -> tuple[list[dict[str, Any]], list[_Entry]]:
    """Problems of the policies that do not parse, and the policies that do."""
    problems: list[dict[str, Any]] = []
    parsed: list[_Entry] = []
    for entry in batch:
        text = entry.piece.text
        message = _parse_error(text)
        if message is None:
            parsed.append(entry)
            continue
        offset = locate_parse_error(text, message, _parse_error)
        problems.append(entry.problem(f"syntax error: {message}{_advice(message)}", offset))
    return problems, parsed


def _validation_problems(batch: Sequence[_Entry], errors: list[cedarpy.ValidationError]
                         ) -> list[dict[str, Any]]:
    grouped: dict[tuple[int, str], list[str]] = {}
    for err in errors:
        number = int(err.policy_id.removeprefix("policy"))
        message = _POLICY_PREFIX.sub("", err.error)
        variants = grouped.setdefault((number, _VARYING.sub(r"\1…", message)), [])
        variants.append(message)
    unrecognized = {n for n, m in grouped if "unrecognized" in m}
    problems = []
    for (number, _), variants in grouped.items():
        variants.sort()  # Cedar reports them in no fixed order
        message = variants[0]
        if number in unrecognized and "unable to find an applicable action" in message:
            continue  # the unknown name already explains it
        others = [m.group(2) for v in variants[1:] for m in _VARYING.finditer(v)]
        if others:
            message += f" (also {', '.join(dict.fromkeys(others))})"
        entry = batch[number]
        offset = locate_problem(entry.piece.text, message)
        problems.append(entry.problem(message + _advice(message), offset))
    return problems


def _validate_batch(batch: Sequence[_Entry], *, parsed: bool = False) -> list[dict[str, Any]]:
    """Problems of one batch of policies: syntax first, then the schema."""
    text = "\n".join(entry.piece.text for entry in batch)
    # Releasing the GIL lets other threads run meanwhile: the event loop, when a load runs
    # in asyncio.to_thread, or the other batches.
    result = cedarpy.validate_policies(text, schema(), release_gil=True)
    if result.validation_passed:
        return []
    if not parsed and any(not err.policy_id for err in result.errors):
        # A syntax error: cedarpy names no policy, so parse them one by one to find it.
        problems, ok = _parse_problems(batch)
        if ok:
            problems += _validate_batch(ok, parsed=True)
        return problems
    located = [err for err in result.errors if err.policy_id]
    problems = _validation_problems(batch, located)
    problems += [batch[0].problem(err.error) for err in result.errors if not err.policy_id]
    return problems


def _threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_THREADS))


def _validate(entries: Sequence[_Entry]) -> list[dict[str, Any]]:
    if not entries:
        return []
    threads = _threads() if len(entries) >= _PARALLEL_FROM else 1
    if threads == 1:
        return _validate_batch(entries)
    size = -(-len(entries) // threads)
    batches = [entries[i:i + size] for i in range(0, len(entries), size)]
    with ThreadPoolExecutor(max_workers=len(batches),
                            thread_name_prefix="corral-policy-validate") as pool:
        results = list(pool.map(_validate_batch, batches))
    return [p for found in results for p in found]


def _shape_problems(entries: Sequence[_Entry]) -> tuple[list[dict[str, Any]], set[int]]:
    """Problems Cedar does not check: empty or duplicate ids, templates. And their entries."""
    problems: list[dict[str, Any]] = []
    bad: set[int] = set()
    first: dict[str, _Entry] = {}
    for i, entry in enumerate(entries):
        if entry.piece.annotation_id == "":
            problems.append(entry.problem("@id is empty; name the policy, like @id(\"tools\"), "
                                          "or remove the annotation"))
            bad.add(i)
        elif (seen := first.setdefault(entry.id, entry)) is not entry:
            where = f"{seen.source}:{seen.position()[0]}"
            problems.append(entry.problem(f"duplicate policy id {entry.id!r}, first used at "
                                          f"{where}; give each policy its own @id"))
            bad.add(i)
        if "?" in entry.piece.text:
            toks = [t.text for t in cedar_tokens(entry.piece.text)]
            slots = {f"?{b}" for a, b in itertools.pairwise(toks) if a == "?"}
            if slots & {"?principal", "?resource"}:
                problems.append(entry.problem("policy templates (?principal, ?resource) are not "
                                              "supported; name the principal or resource, or "
                                              "use a condition"))
                bad.add(i)
    return problems, bad


def compile_policies(sources: Sequence[PolicySource], *, strict: bool,
                     known_valid: Set[str] = frozenset()) -> CompiledPolicies:
    """Validate every policy of the sources and build one pre-parsed set; PolicyInvalid if not.

    In non-strict mode a permit-all policy with id :data:`DEFAULT_ALLOW_ID` is added last,
    so a request is allowed unless a ``forbid`` matches (or evaluation fails).
    """
    entries: list[_Entry] = []
    for source in sources:
        index = LineIndex(source.text)
        entries += [_Entry(source.name, index, piece) for piece in split(source.text)]
    problems, bad = _shape_problems(entries)
    todo = [e for i, e in enumerate(entries) if i not in bad and e.piece.text not in known_valid]
    problems += _validate(todo)
    raise_problems(sorted(problems, key=lambda p: (p["file"], p["line"] or 0, p["column"] or 0,
                                                   p["message"])))

    texts = [entry.piece.text for entry in entries]
    infos = [PolicyInfo(e.id, e.source, *e.position(), e.piece.effect, e.piece.text)
             for e in entries]
    if not strict:
        texts.append(_DEFAULT_ALLOW)
        infos.append(PolicyInfo(DEFAULT_ALLOW_ID, _BUILTIN, 0, 0, "permit", _DEFAULT_ALLOW))
    try:
        policy_set = cedarpy.PolicySet.from_str("\n".join(texts), release_gil=True)
    except ValueError as exc:  # each policy parsed alone, so this is a bug in Corral
        raise PolicyInvalid(f"the policies validated one by one but not together: {exc}",
                            hint="this is a bug in Corral; please report it with the "
                                 "policy files") from exc
    if len(policy_set) != len(texts):
        raise PolicyInvalid(f"Cedar read {len(policy_set)} policies where Corral split "
                            f"{len(texts)}, so decisions could name the wrong policy",
                            hint="this is a bug in Corral; please report it with the policy "
                                 "files")
    ids = {f"policy{i}": info.id for i, info in enumerate(infos)}
    return CompiledPolicies(policy_set, tuple(infos), ids, frozenset(texts))
