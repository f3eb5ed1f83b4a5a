"""containerd's filter syntax (``filters.Parse`` / ``ParseAll``) for ``List``.

Grammar (containerd's ``filters`` package)::

    selectors := selector ("," selector)*          all must match
    selector  := fieldpath (operator value)?       no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := a Go string literal in "..." (and, for ~= values, /.../ or |...|)

Several filter strings match when any of them matches; none (or one empty
string) matches everything.  White space between tokens is skipped.  A
snapshot exposes ``name``, ``parent``, ``kind`` (``active``, ``view``,
``committed``) and ``labels.<key>`` (the key is the rest of the path joined
with dots, so ``labels."containerd.io/gc.root"`` and
``labels.containerd.io/...`` reach the same label only when quoted as one
field).  ``==`` needs the field present and equal; ``!=`` compares with the
empty string when absent; ``~=`` is a regular-expression search (Python's
``re``, which agrees with Go's RE2 on the usual constructs; a pattern that
does not compile is an ``InvalidArgument``, where containerd matches nothing).

Malformed input raises ``InvalidArgument`` with containerd's message shape
(``filters: parse error: [input >|x|< rest]: what was expected``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import InvalidArgument

Fields = Callable[[list[str]], "tuple[str, bool]"]

_EOF, _QUOTED, _VALUE, _FIELD, _SEPARATOR, _OPERATOR, _ILLEGAL = range(-1, -8, -1)
_QUOTES = "/|\""
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\"}


def _is_field_char(c: str) -> bool:
    return c == "_" or ("A" <= c <= "Z") or ("a" <= c <= "z") or ("0" <= c <= "9")


def _is_value_char(c: str) -> bool:
    if c == "," or c.isspace():
        return False
    return unicodedata.category(c)[0] in "LMNPS"


class _Scanner:
    """containerd's filter scanner: one token at a time, positions in characters."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the last character read
        self.next_pos = 0  # just past it
        self.value_mode = False
        self.error = ""

    def _next(self) -> str | int:
        if self.next_pos >= len(self.text):
            self.pos = self.next_pos
            return _EOF
        self.pos = self.next_pos
        c = self.text[self.next_pos]
        self.next_pos += 1
        if c == "\0":
            self._fail("unexpected null")
            return _ILLEGAL
        return c

    def peek(self) -> str | int:
        saved = self.pos, self.next_pos
        c = self._next()
        self.pos, self.next_pos = saved
        return c

    def _fail(self, message: str) -> None:
        if not self.error:
            self.error = message

    def scan(self) -> tuple[int, int | str, str]:
        """(position, token kind or the character itself, text)."""
        c = self._next()
        while isinstance(c, str) and c.isspace():
            c = self._next()
        start = self.pos
        if c == _EOF or c == _ILLEGAL:
            return start, c, ""
        assert isinstance(c, str)
        if c in _QUOTES:
            ok = self._scan_quoted(c)
            return start, (_QUOTED if ok else _ILLEGAL), self.text[start:self.next_pos]
        if c in ",.":
            self.value_mode = False
            return start, _SEPARATOR, c
        if c in "=!~":
            while self.peek() in ("=", "!", "~"):
                self._next()
            self.value_mode = True
            return start, _OPERATOR, self.text[start:self.next_pos]
        if self.value_mode:
            while isinstance(p := self.peek(), str) and _is_value_char(p):
                self._next()
            self.value_mode = False
            return start, _VALUE, self.text[start:self.next_pos]
        if _is_field_char(c):
            while isinstance(p := self.peek(), str) and _is_field_char(p):
                self._next()
            return start, _FIELD, self.text[start:self.next_pos]
        return start, c, ""

    def _scan_quoted(self, quote: str) -> bool:
        legal = True
        c = self._next()
        while c != quote:
            if c == "\n" or not isinstance(c, str):
                self._fail("quoted literal not terminated")
                return False
            if c == "\\":
                c, ok = self._scan_escape(quote)
                legal = legal and ok
            else:
                c = self._next()
        return legal

    def _scan_escape(self, quote: str) -> tuple[str | int, bool]:
        c = self._next()
        if isinstance(c, str) and (c in "abfnrtv\\" or c == quote):
            return self._next(), True
        digits = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}
        if isinstance(c, str) and c in "01234567":
            return self._scan_digits(c, 8, 3)
        if isinstance(c, str) and c in digits:
            base, n = digits[c]
            return self._scan_digits(self._next(), base, n)
        self._fail("illegal escape sequence")
        return c, False

    def _scan_digits(self, c: str | int, base: int, n: int) -> tuple[str | int, bool]:
        while n > 0 and isinstance(c, str) and _digit(c) < base:
            c = self._next()
            n -= 1
        if n > 0:
            self._fail("illegal numeric escape sequence")
            return c, False
        return c, True


def _digit(c: str) -> int:
    if "0" <= c <= "9":
        return ord(c) - ord("0")
    if "a" <= c.lower() <= "f":
        return ord(c.lower()) - ord("a") + 10
    return 16


def unquote(s: str) -> str:
    """A Go string literal quoted with ``"``, ``/`` or ``|`` (the quote escapable by ``\\``)."""
    if len(s) < 2 or s[0] != s[-1] or s[0] not in "\"'/|":
        raise ValueError("quote syntax error")
    quote, body = s[0], s[1:-1]
    if "\n" in body:
        raise ValueError("quote syntax error")
    out: list[str] = []
    raw = bytearray()  # \x and octal escapes are bytes, possibly not UTF-8 on their own

    def flush() -> None:
        if raw:
            out.append(raw.decode("utf-8", errors="surrogateescape"))
            raw.clear()

    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError("quote syntax error")
        if c != "\\":
            flush()
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("quote syntax error")
        e = body[i + 1]
        i += 2
        if e in _ESCAPES:
            flush()
            out.append(_ESCAPES[e])
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i:i + n]
            if len(digits) < n or any(_digit(d) >= 16 for d in digits):
                raise ValueError("quote syntax error")
            v = int(digits, 16)
            i += n
            if e == "x":
                raw.append(v)
            else:
                if v > 0x10FFFF:
                    raise ValueError("quote syntax error")
                flush()
                out.append(chr(v))
        elif e in "01234567":
            digits = body[i - 1:i + 2]
            if len(digits) < 3 or any(not "0" <= d <= "7" for d in digits):
                raise ValueError("quote syntax error")
            v = int(digits, 8)
            if v > 255:
                raise ValueError("quote syntax error")
            raw.append(v)
            i += 2
        elif e in "'\"|/":
            if e != quote:
                raise ValueError("quote syntax error")
            flush()
            out.append(e)
        else:
            raise ValueError("quote syntax error")
    flush()
    return "".join(out)


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "?", "==", "!=", "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, fields: Fields) -> bool:
        value, present = fields(list(self.fieldpath))
        if self.operator == "?":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Any of the alternatives, each a conjunction of selectors (no alternatives: all)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, fields: Fields) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(fields) for s in alt) for alt in self.alternatives)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def error(self, pos: int, message: str) -> InvalidArgument:
        if pos < len(self.text):
            where = f"[{self.text[:pos]} >|{self.text[pos]}|< {self.text[pos + 1:]}]"
        else:
            where = f"[{self.text}]"
        return InvalidArgument(f"filters: parse error: {where}: {message}")

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            c = self.scanner.peek()
            if c == ",":
                pos, kind, _ = self.scanner.scan()
                if kind != _SEPARATOR:
                    raise self.error(pos, "expected a separator")
                selectors.append(self.selector())
            elif c == _EOF:
                return tuple(selectors)
            else:
                raise self.error(self.scanner.next_pos, f"unexpected input: {c}")

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(tuple(path), "?")
        pos, kind, text = self.scanner.scan()
        if kind == _ILLEGAL:
            raise self.error(pos, self.scanner.error)
        if kind != _OPERATOR:
            raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')
        if text not in ("==", "!=", "~="):
            raise self.error(pos, f"unsupported operator {text!r}")
        pos, vkind, vtext = self.scanner.scan()
        if vkind == _EOF:
            raise InvalidArgument(f"filters: unexpected EOF in {self.text!r}")
        if vkind in (_VALUE, _FIELD):
            value = vtext
        elif vkind == _QUOTED:
            value = self.unquote(pos, vtext, alternatives=text == "~=")
        elif vkind == _ILLEGAL:
            raise self.error(pos, self.scanner.error)
        else:
            raise self.error(pos, "expected value or quoted")
        pattern = None
        if text == "~=":
            try:
                pattern = re.compile(value)
            except re.error as e:
                raise InvalidArgument(f"filters: invalid regular expression {value!r}: {e}") \
                    from None
        return Selector(tuple(path), text, value, pattern)

    def fieldpath(self) -> list[str]:
        path = [self.field()]
        while self.scanner.peek() == ".":
            pos, kind, _ = self.scanner.scan()
            if kind != _SEPARATOR:
                raise self.error(pos, "expected a field separator (`.`)")
            path.append(self.field())
        return path

    def field(self) -> str:
        pos, kind, text = self.scanner.scan()
        if kind == _FIELD:
            return text
        if kind == _QUOTED:
            return self.unquote(pos, text, alternatives=False)
        if kind == _ILLEGAL:
            raise self.error(pos, self.scanner.error)
        raise self.error(pos, "expected field or quoted")

    def unquote(self, pos: int, text: str, alternatives: bool) -> str:
        if not alternatives and text[0] not in "'\"":
            raise self.error(pos, "invalid quote encountered")
        try:
            return unquote(text)
        except ValueError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def parse(text: str) -> tuple[Selector, ...]:
    """One filter string: its selectors (all must match); empty matches everything."""
    if text == "":
        return ()
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> Filter:
    """Several filter strings, any of which may match (``ParseAll``)."""
    alternatives = []
    for text in texts:
        selectors = parse(text)
        if not selectors:
            return Filter(())
        alternatives.append(selectors)
    return Filter(tuple(alternatives))
