"""Refusing split patterns whose matching time can explode, before any text meets them.

Both regex engines behind our tokenizers (`regex` for the reference encoder, fancy-regex inside
tiktoken) backtrack. A pattern such as `(?:a|aa)+(?=b)` tries every way of cutting a run of a's
before giving up, which takes exponential time in `regex` and makes tiktoken's engine panic at
its backtracking limit. Two constructs cause that, and no pattern we ship needs either:

- a backreference (`\\1`, `(?P=name)`, `\\g<1>`, `\\k<name>`): matching one is NP-hard in general;
- an unbounded quantifier (`*`, `+`, `{n,}`) over a group that can itself match in several ways
  (it holds a quantifier or an alternation), unless the outer quantifier is possessive (`++`,
  `*+`) or the group atomic (`(?>...)`), which forbid backtracking into it. Lookarounds are
  checked the same way, as is everything inside them.

The check reads the pattern's syntax only, so it also refuses some harmless patterns (such as
`(?:ab|cd)+`); the error says how to write those so that they pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptlab.errors import GptlabError

_ESCAPES_WITH_BRACES = set("pPNxuUgk")  # \p{L}, \N{name}, \x{263a}, \g<1> ...
# What opens a group after "(": (?: (?i: (?= (?! (?<= (?<! (?> (?| (?P<name> (?<name>
_GROUP_OPENING = re.compile(r"\(\?(?:P?<(?![=!])[^>]*>|[a-zA-Z^-]*:|<?[=!]|>|\|)|\(")
_INLINE_FLAGS = re.compile(r"\(\?[a-zA-Z^-]*\)")  # (?i) sets flags and opens no group


@dataclass
class _Group:
    atomic: bool = False
    ambiguous: bool = False  # can match the same text in more than one way (quantifier, alternation)


def check_pattern_safety(pattern: str) -> None:
    """GptlabError naming the construct when unsafe_construct() finds one in `pattern`."""
    try:
        problem = unsafe_construct(pattern)
    except (IndexError, ValueError):  # syntax this reader does not follow: refuse rather than guess
        problem = "syntax gptlab cannot check for safety"
    if problem is not None:
        raise GptlabError(
            f"split pattern {pattern!r} holds {problem}, which can make splitting take exponential time; "
            "use 'gpt4' or 'gpt2', or make that quantifier possessive (++, *+) or the group atomic (?>...)"
        )


def unsafe_construct(pattern: str) -> str | None:
    """A description of the first construct of `pattern` that can make matching take
    exponential time, or None when it has none. `pattern` must already compile."""
    stack = [_Group()]
    last_atom: _Group | None = None  # the group just closed (what a quantifier would apply to)
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        atom: _Group | None = None
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt.isdigit() and nxt != "0":
                return f"the backreference \\{nxt}"
            if nxt in ("g", "k") and pattern[i + 2 : i + 3] in ("<", "{", "'"):
                return f"the backreference \\{nxt}{pattern[i + 2]}...{_closing(pattern[i + 2])}"
            i = _after_escape(pattern, i)
        elif c == "[":
            i = _after_class(pattern, i)
        elif c == "(":
            if pattern.startswith("(?P=", i):
                return "the backreference (?P=...)"
            if pattern.startswith("(?#", i):
                i = pattern.index(")", i) + 1
                continue
            flags = _INLINE_FLAGS.match(pattern, i)
            if flags:
                i = flags.end()
                continue
            opening = _GROUP_OPENING.match(pattern, i)
            if opening is None:
                raise ValueError(f"unknown group at {i}")
            stack.append(_Group(atomic=opening.group() == "(?>"))
            i = opening.end()
        elif c == ")":
            atom = stack.pop()
            stack[-1].ambiguous |= atom.ambiguous and not atom.atomic
            i += 1
        elif c == "|":
            stack[-1].ambiguous = True
            i += 1
        elif c in "*+?" or (c == "{" and _repeat_end(pattern, i)):
            end = i + 1 if c != "{" else _repeat_end(pattern, i)
            spec = pattern[i:end]
            unbounded = c in "*+" or spec.endswith(",}")
            variable = c != "{" or "," in spec
            possessive = pattern[end : end + 1] == "+"
            end += 1 if pattern[end : end + 1] in ("+", "?") else 0
            if unbounded and not possessive and last_atom is not None and last_atom.ambiguous and not last_atom.atomic:
                return f"the unbounded quantifier {spec!r} over a group that can match in several ways"
            stack[-1].ambiguous |= variable
            i = end
        else:
            i += 1
        last_atom = atom
    return None


def _closing(opening: str) -> str:
    return {"<": ">", "{": "}", "'": "'"}[opening]


def _after_escape(pattern: str, i: int) -> int:
    """The index after the escape sequence starting at pattern[i] == '\\'."""
    if pattern[i + 1 : i + 2] in _ESCAPES_WITH_BRACES and pattern[i + 2 : i + 3] in ("{", "<"):
        return pattern.index(_closing(pattern[i + 2]), i + 3) + 1
    return i + 2


def _after_class(pattern: str, i: int) -> int:
    """The index after the character class starting at pattern[i] == '['."""
    j = i + 1
    if pattern[j : j + 1] == "^":
        j += 1
    if pattern[j : j + 1] == "]":  # a leading ] is a literal
        j += 1
    while pattern[j] != "]":
        if pattern[j] == "\\":
            j = _after_escape(pattern, j)
        elif pattern.startswith("[:", j):  # a POSIX class such as [:alpha:]
            j = pattern.index(":]", j) + 2
        else:
            j += 1
    return j + 1


def _repeat_end(pattern: str, i: int) -> int:
    """The index after a {m}, {m,} or {m,n} repetition at pattern[i], or 0 if '{' is a literal."""
    close = pattern.find("}", i)
    inner = pattern[i + 1 : close] if close > 0 else ""
    parts = inner.split(",")
    if not inner or len(parts) > 2 or not parts[0].isdigit() or not all(p.isdigit() or p == "" for p in parts[1:]):
        return 0
    return close + 1
