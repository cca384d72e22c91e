"""Varlink interface definitions (the IDL of varlink.org, as systemd writes
it): parsed from their text, which is what GetInterfaceDescription answers,
and used to check the parameters of each call as sd-varlink's dispatch
tables do (an unknown, missing or mistyped field is InvalidParameter naming
the field).

The IDL is written by us (``*.varlink`` files next to the services) with the
definitions of systemd's interfaces; asyncvarlink renders its interfaces
from Python annotations instead, which can't name a parameter "class", keep
systemd's order of methods, or mark single fields of a reply required."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

SIMPLE = frozenset({"bool", "int", "float", "string", "object"})


class IdlError(ValueError):
    pass


class BadParameter(Exception):
    """A call's parameter does not match its definition."""

    def __init__(self, parameter: str) -> None:
        super().__init__(parameter)
        self.parameter = parameter


@dataclass(frozen=True)
class Type:
    """KIND: a simple type's name, "named", "struct", "enum", "array", "map",
    "optional"; ITEM: the element of an array, map or optional; NAME: a named
    type's name; FIELDS: a struct's; VALUES: an enum's."""

    kind: str
    item: Type | None = None
    name: str = ""
    fields: tuple[tuple[str, Type], ...] = ()
    values: tuple[str, ...] = ()


@dataclass
class Interface:
    name: str
    text: str
    types: dict[str, Type] = field(default_factory=dict)
    methods: dict[str, tuple[Type, Type]] = field(default_factory=dict)
    errors: dict[str, Type] = field(default_factory=dict)


_TOKEN = re.compile(r"\s*(?:(#[^\n]*)|(->|\[\]|\[string\]|[(),:?])|([A-Za-z_][A-Za-z0-9_.]*))")


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                if text[pos:].strip():
                    raise IdlError(f"unexpected {text[pos:pos + 20]!r}")
                break
            pos = m.end()
            if m.group(1) is None:
                self.tokens.append(m.group(2) or m.group(3))
        self.at = 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise IdlError(f"expected {expected or 'more'}, got {token!r}")
        self.at += 1
        return token

    def type(self) -> Type:
        token = self.peek()
        if token == "?":
            self.take()
            return Type("optional", self.type())
        if token == "[]":
            self.take()
            return Type("array", self.type())
        if token == "[string]":
            self.take()
            return Type("map", self.type())
        if token == "(":
            return self.struct_or_enum()
        name = self.take()
        return Type(name) if name in SIMPLE else Type("named", name=name)

    def struct_or_enum(self) -> Type:
        self.take("(")
        fields: list[tuple[str, Type]] = []
        values: list[str] = []
        while self.peek() != ")":
            name = self.take()
            if self.peek() == ":":
                self.take()
                fields.append((name, self.type()))
            else:
                values.append(name)
            if self.peek() == ",":
                self.take()
        self.take(")")
        if fields and values:
            raise IdlError("a struct with enum values")
        return Type("enum", values=tuple(values)) if values else Type("struct", fields=tuple(fields))


def parse(text: str) -> Interface:
    p = _Parser(text)
    p.take("interface")
    iface = Interface(p.take(), text)
    while p.peek() is not None:
        keyword = p.take()
        name = p.take()
        if keyword == "type":
            iface.types[name] = p.type()
        elif keyword == "method":
            params = p.struct_or_enum()
            p.take("->")
            iface.methods[name] = (params, p.struct_or_enum())
        elif keyword == "error":
            iface.errors[name] = p.struct_or_enum()
        else:
            raise IdlError(f"unknown keyword {keyword!r}")
    return iface


# --- checking values ---------------------------------------------------------------


def _check(iface: Interface, t: Type, value: Any) -> bool:
    kind = t.kind
    if kind == "optional":
        return value is None or _check(iface, t.item, value)  # type: ignore[arg-type]
    if kind == "named":
        return _check(iface, iface.types[t.name], value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return True
    if kind == "enum":
        return isinstance(value, str) and value in t.values
    if kind == "array":
        return isinstance(value, list) and all(_check(iface, t.item, v) for v in value)  # type: ignore[arg-type]
    if kind == "map":
        return isinstance(value, dict) and all(_check(iface, t.item, v) for v in value.values())  # type: ignore[arg-type]
    if kind == "struct":
        return isinstance(value, dict) and check_fields(iface, t, value) is None
    raise IdlError(f"unknown type kind {kind}")


def check_fields(iface: Interface, struct: Type, values: dict[str, Any]) -> str | None:
    """The first field of VALUES that does not match STRUCT (unknown, missing
    although required, or of the wrong type), or None."""
    known = dict(struct.fields)
    for name in values:
        if name not in known:
            return name
    for name, t in struct.fields:
        value = values.get(name)
        if value is None and t.kind != "optional":
            return name
        if not _check(iface, t, value):
            return name
    return None


def check_call(iface: Interface, method: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The call's parameters, every field of the method present (None where
    the caller gave none); raises BadParameter naming the first bad one."""
    params, _ = iface.methods[method]
    bad = check_fields(iface, params, parameters)
    if bad is not None:
        raise BadParameter(bad)
    return {name: parameters.get(name) for name, _t in params.fields}


def strip_comments(text: str) -> str:
    """The definitions alone: comments and blank lines removed (what two
    interfaces with the same definitions have in common)."""
    lines = [line.split("#", 1)[0].rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())
