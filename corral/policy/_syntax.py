"""Just enough Cedar syntax to split policy text into policies and point at a token.

cedarpy reports parse and validation errors without a source position: a parse error is a
bare message ("unexpected token `}`") and a validation error names a positional policy id
("policy3"). Corral therefore splits each file into its policies itself (a policy always
ends with ``;`` outside strings and comments, so the n-th piece is Cedar's ``policy<n>``)
and finds the line and column of a problem from the policy's own text.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["LineIndex", "Piece", "Token", "locate_parse_error", "locate_problem", "split",
           "tokens", "unescape"]

_STRING = r'"(?:[^"\\]|\\.)*"'
# Only strings, comments and semicolons matter for splitting, which keeps it fast.
_SPLIT = re.compile(rf'{_STRING}|//[^\n]*|;', re.S)
_TRIVIA = re.compile(r'(?:\s+|//[^\n]*)*')
_ANNOTATION = re.compile(rf'@\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\(\s*({_STRING})\s*\))?', re.S)
_EFFECT = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
_TOKEN = re.compile(rf'''
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*)
  | (?P<string>{_STRING})
  | (?P<bad>"[\s\S]*)                      # an unterminated string runs to the end
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*|\d+)
  | (?P<op>==|!=|<=|>=|&&|\|\||::)
  | (?P<char>[\s\S])
''', re.X)
_ESCAPE = re.compile(r'\\(u\{([0-9A-Fa-f]{1,6})\}|.)', re.S)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\", "'": "'", '"': '"',
            "*": "*"}
_QUOTED = re.compile(r"`([^`]+)`|'([^']+)'")
_PARSE_EOF = "unexpected end of input"
_STILL_GOOD = (_PARSE_EOF, "unexpected token `;`")
_SYNTAX_ERRORS = ("unexpected token", "invalid token", "unrecognized token", "extra token")


@dataclass(frozen=True, slots=True)
class Piece:
    """One policy of a text: where it starts and ends, its @id and effect as written."""

    start: int  # offset of its first annotation or its effect
    end: int  # offset just past its ";" (or the end of the text)
    text: str
    annotation_id: str | None  # the @id("...") value, unescaped; None when absent
    effect: str  # "permit", "forbid", or whatever word stands there in a broken policy


@dataclass(frozen=True, slots=True)
class Token:
    """A token of Cedar text, with its offset."""

    start: int
    end: int
    kind: str
    text: str


class LineIndex:
    """Turns an offset into a 1-based (line, column), columns counted in characters."""

    def __init__(self, text: str) -> None:
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based line and column of a character offset."""
        line = bisect.bisect_right(self._starts, offset) - 1
        return line + 1, offset - self._starts[line] + 1


def unescape(literal: str) -> str:
    """The value of a Cedar string literal (with its quotes)."""

    def one(m: re.Match[str]) -> str:
        if m.group(2) is not None:
            return chr(int(m.group(2), 16))
        return _ESCAPES.get(m.group(1), m.group(0))

    return _ESCAPE.sub(one, literal[1:-1])


def _skip_trivia(text: str, pos: int) -> int:
    """The offset of the first character at or after pos that is not space or a comment."""
    m = _TRIVIA.match(text, pos)
    return m.end() if m else pos


def _piece(text: str, start: int, end: int) -> Piece:
    annotation_id: str | None = None
    pos = start
    while True:
        m = _ANNOTATION.match(text, pos)
        if m is None or (m.group(2) is None and text.startswith("(", _skip_trivia(text, m.end()))):
            break  # not an annotation, or a broken one: Cedar will say what is wrong
        if m.group(1) == "id" and annotation_id is None:
            annotation_id = unescape(m.group(2)) if m.group(2) else ""
        pos = _skip_trivia(text, m.end())
    effect = _EFFECT.match(text, pos)
    return Piece(start, end, text[start:end], annotation_id, effect.group(0) if effect else "")


def split(text: str) -> list[Piece]:
    """The policies of a text in order, so that piece n is Cedar's ``policy<n>``."""
    pieces: list[Piece] = []
    begin = 0
    for m in _SPLIT.finditer(text):
        if m.group(0) != ";":
            continue
        start = _skip_trivia(text, begin)
        pieces.append(_piece(text, start, m.end()))
        begin = m.end()
    start = _skip_trivia(text, begin)
    if start < len(text):  # a last policy without its ";": Cedar will say what is wrong
        pieces.append(_piece(text, start, len(text)))
    return pieces


def tokens(text: str) -> Iterator[Token]:
    """The tokens of Cedar text, without whitespace and comments."""
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup or "char"
        if kind not in ("ws", "comment"):
            yield Token(m.start(), m.end(), kind, m.group(0))


def _named(message: str) -> list[str]:
    """What a message quotes in `backticks` or 'quotes', then the word after its last ": "."""
    named = [a or b for a, b in _QUOTED.findall(message)]
    tail = message.rsplit(": ", 1)
    if len(tail) == 2 and tail[1].strip() and " " not in tail[1].strip():
        named.append(tail[1].strip())
    return [n for n in named if not re.fullmatch(r"policy\d+", n)]


def _find(toks: list[Token], name: str) -> Token | None:
    """The first place the tokens of ``name`` occur in ``toks``."""
    want = [t.text for t in tokens(name)]
    if not want:
        return None
    for i in range(len(toks) - len(want) + 1):
        if all(toks[i + j].text == w for j, w in enumerate(want)):
            return toks[i]
    return None


def locate_problem(text: str, message: str) -> int:
    """Offset in a policy's text of the first thing the message names, else 0."""
    toks = list(tokens(text))
    for name in _named(message):
        found = _find(toks, name)
        if found is not None:
            return found.start
    return 0


def locate_parse_error(text: str, message: str, parse: Callable[[str], str | None]) -> int:
    """Offset in a policy's text of the token a parse error is about.

    ``parse`` returns Cedar's error message for a text, or None when it parses. Cedar's parser
    recovers at the next ``;``, so a prefix of the policy closed with ``;`` fails with
    "unexpected token `;`" while the prefix is still good, and with the real error once it
    includes the bad token: a binary search over token prefixes finds that token. Errors
    Cedar raises only once a policy is read ("'=' is not a valid operator") point at what
    the message names instead.
    """
    toks = list(tokens(text))
    if not toks:
        return 0
    if message == _PARSE_EOF:  # the policy stops short: point just past its last token
        return toks[-1].end
    if not message.startswith(_SYNTAX_ERRORS):
        return locate_problem(text, message)
    lo, hi = 0, len(toks) - 1  # the whole policy, through toks[hi], is known to be bad
    while lo < hi:
        mid = (lo + hi) // 2
        error = parse(text[:toks[mid].end] + " ;")
        if error is None or error in _STILL_GOOD:
            lo = mid + 1
        else:
            hi = mid
    return toks[hi].start
