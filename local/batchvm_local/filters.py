"""The ``filter`` of Compute Engine list calls, the part of its syntax that matters here.

Supported: expressions ``FIELD OP VALUE`` joined by whitespace or ``AND`` (optionally in
parentheses), where FIELD is a dotted path into the resource (``labels.batchvm-job-id``,
``status``, ``name``, ``scheduling.preemptible``), VALUE is quoted or bare, and OP is ``=``,
``!=``, ``:`` (``:*`` = the field is present; ``*`` is a wildcard) or the older regular-expression
forms ``eq`` / ``ne``. ``OR`` and ``NOT`` are refused rather than misread.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<paren>[()])
      | (?P<keyword>AND|OR|NOT)(?=[\s()]|$)
      | (?P<field>[A-Za-z_][\w.\-]*)\s*(?P<op>!=|=|:|\s(?:eq|ne)\s)\s*
        (?P<value>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s()]+)
    )""",
    re.VERBOSE,
)

_MISSING = object()


class FilterError(ValueError):
    pass


def compile_filter(text: str | None) -> Callable[[dict], bool]:
    """A predicate over a resource's JSON; raises :class:`FilterError` for what it cannot read."""
    tests: list[Callable[[dict], bool]] = []
    text = (text or "").strip()
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FilterError(f"Invalid list filter expression at {text[pos:]!r}")
        pos = match.end()
        if match.group("keyword") in ("OR", "NOT"):
            raise FilterError(f"{match.group('keyword')} is not supported by the local stand-in")
        if match.group("field"):
            tests.append(_expression(match.group("field"), match.group("op").strip(), match.group("value")))
    return lambda resource: all(test(resource) for test in tests)


def _expression(field: str, op: str, raw: str) -> Callable[[dict], bool]:
    value = _unquote(raw)
    if op in ("eq", "ne"):
        pattern = re.compile(value)

        def regex(resource: dict) -> bool:
            actual = _lookup(resource, field)
            hit = actual is not _MISSING and pattern.fullmatch(_text(actual)) is not None
            return hit if op == "eq" else not hit

        return regex
    if op == ":":

        def has(resource: dict) -> bool:
            actual = _lookup(resource, field)
            if actual is _MISSING:
                return False
            return value == "*" or fnmatch.fnmatchcase(_text(actual), value)

        return has

    def compare(resource: dict) -> bool:
        actual = _lookup(resource, field)
        equal = actual is not _MISSING and _text(actual) == value
        return equal if op == "=" else not equal

    return compare


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    return raw


def _lookup(resource: dict, field: str) -> object:
    """``labels.a.b`` first tries key ``a.b`` under labels: label keys cannot hold dots, other keys might."""
    node: object = resource
    parts = field.split(".")
    while parts:
        if not isinstance(node, dict):
            return _MISSING
        for size in range(len(parts), 0, -1):
            key = ".".join(parts[:size])
            if key in node:
                node = node[key]
                parts = parts[size:]
                break
        else:
            return _MISSING
    return node


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
