"""QMP's input framing, sans-IO: bytes in, top-level JSON values (or QEMU-worded errors) out.

Like QEMU's json-streamer, it needs no newline framing, bounds the memory a client can make it
hold, rejects duplicate keys and the non-standard constants (NaN, Infinity), and recovers after
a stray byte (a client sends 0xFF to reset the parser).
"""
from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["JSONSplitter", "MAX_REQUEST_SIZE", "MAX_NESTING"]

#: Largest single request (bytes of JSON text) accepted.
MAX_REQUEST_SIZE = 1 << 20
#: Deepest nesting of arrays/objects accepted (QEMU's MAX_NESTING).
MAX_NESTING = 1024


class _DuplicateKey(Exception):
    pass


class _BadConstant(Exception):
    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _BadConstant(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook, parse_constant=_reject_constant)

# Bytes that are a lexical error anywhere: control characters other than the
# JSON whitespace, and 0xFE/0xFF which never occur in UTF-8.  Per the QMP spec
# a client sends such a byte to force the parser back to a known-good state.
_BAD = b"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
_RE_IN_STRING = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_RE_NESTED = re.compile(rb'[{}\[\]"' + _BAD + rb']')
_RE_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]",:' + _BAD + rb']')
_WHITESPACE = frozenset(b" \t\r\n")
_BAD_SET = frozenset(list(range(0x00, 0x09)) + [0x0B, 0x0C] + list(range(0x0E, 0x20)) + [0xFE, 0xFF])


def _describe_byte(b: int) -> str:
    return chr(b) if 0x20 <= b < 0x7F else "\\x%02x" % b


class JSONSplitter:
    """Cuts a byte stream into top-level JSON values, like QEMU's json-streamer.

    :meth:`feed` returns a list of ``("obj", value)`` for each parsed value and
    ``("err", desc)`` for each error.  Memory is bounded by ``max_size``: a
    value larger than that produces one error and is skipped to its end.
    """

    def __init__(self, max_size: int = MAX_REQUEST_SIZE, max_depth: int = MAX_NESTING):
        self.max_size = max_size
        self.max_depth = max_depth
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.in_token = False      # a bare top-level scalar (number, keyword)
        self.discard = False       # skipping the rest of a rejected value

    def _take(self, data: bytes, start: int, end: int, out: list) -> None:
        if self.discard or start >= end:
            return
        self.buf += data[start:end]
        if len(self.buf) > self.max_size:
            out.append(("err", "JSON token size limit exceeded"))
            self.buf = bytearray()
            self.discard = True

    def _complete(self, out: list) -> None:
        raw = bytes(self.buf)
        token = self.in_token
        discard = self.discard
        self._reset()
        if discard:
            return
        out.append(self._parse(raw, token))

    @staticmethod
    def _parse(raw: bytes, token: bool) -> tuple[str, Any]:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return ("err", "JSON parse error, invalid UTF-8 sequence in string")
        try:
            value, end = _DECODER.raw_decode(text)
            if text[end:].strip(" \t\r\n"):
                raise json.JSONDecodeError("Extra data", text, end)
            return ("obj", value)
        except _DuplicateKey:
            return ("err", "JSON parse error, duplicate key")
        except _BadConstant as exc:
            return ("err", "JSON parse error, invalid keyword '%s'" % exc.args[0])
        except RecursionError:
            return ("err", "JSON nesting depth limit exceeded")
        except json.JSONDecodeError as exc:
            if token and text.isalpha():
                return ("err", "JSON parse error, invalid keyword '%s'" % text)
            msg = exc.msg[:1].lower() + exc.msg[1:]
            return ("err", "JSON parse error, %s" % msg)
        except ValueError:  # an integer of more digits than Python converts (4300)
            return ("err", "JSON parse error, number too long")

    def _lex_error(self, b: int, out: list) -> None:
        self._reset()
        out.append(("err", "JSON parse error, stray '%s'" % _describe_byte(b)))

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        i, n = 0, len(data)
        while i < n:
            if self.in_string:
                if self.escape:
                    b = data[i]
                    if b in _BAD_SET or b < 0x20:
                        self._lex_error(b, out)
                    else:
                        self._take(data, i, i + 1, out)
                        self.escape = False
                    i += 1
                    continue
                m = _RE_IN_STRING.search(data, i)
                if m is None:
                    self._take(data, i, n, out)
                    break
                j = m.start()
                b = data[j]
                if b == 0x22:  # '"'
                    self._take(data, i, j + 1, out)
                    self.in_string = False
                    if self.depth == 0:
                        self._complete(out)
                elif b == 0x5C:  # '\\'
                    self._take(data, i, j + 1, out)
                    self.escape = True
                else:
                    self._take(data, i, j, out)
                    self._lex_error(b, out)
                i = j + 1
            elif self.depth > 0:
                m = _RE_NESTED.search(data, i)
                if m is None:
                    self._take(data, i, n, out)
                    break
                j = m.start()
                b = data[j]
                if b in b"{[":
                    self._take(data, i, j + 1, out)
                    self.depth += 1
                    if self.depth > self.max_depth and not self.discard:
                        out.append(("err", "JSON nesting depth limit exceeded"))
                        self.buf = bytearray()
                        self.discard = True
                elif b in b"}]":
                    self._take(data, i, j + 1, out)
                    self.depth -= 1
                    if self.depth == 0:
                        self._complete(out)
                elif b == 0x22:
                    self._take(data, i, j + 1, out)
                    self.in_string = True
                else:
                    self._take(data, i, j, out)
                    self._lex_error(b, out)
                i = j + 1
            elif self.in_token:
                m = _RE_TOKEN_END.search(data, i)
                if m is None:
                    self._take(data, i, n, out)
                    break
                j = m.start()
                self._take(data, i, j, out)
                self._complete(out)
                i = j  # the terminator is looked at again from the idle state
            else:
                b = data[i]
                if b in _WHITESPACE:
                    i += 1
                elif b in b"{[":
                    self.depth = 1
                    self._take(data, i, i + 1, out)
                    i += 1
                elif b == 0x22:
                    self.in_string = True
                    self._take(data, i, i + 1, out)
                    i += 1
                elif b in b"}],:" or b in _BAD_SET:
                    self._lex_error(b, out)
                    i += 1
                else:
                    self.in_token = True
        return out
