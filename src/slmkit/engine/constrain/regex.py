"""A regular-expression subset, parsed to a small syntax tree (and printed back).

The subset, with Python ``re``'s meaning under ``re.ASCII`` and ``re.fullmatch`` (the whole text must match):

* literals, ``.`` (any character but a newline), escapes of metacharacters (``\\.`` ``\\(`` ...), ``\\n \\t \\r
  \\f \\v \\a \\0``, ``\\xhh \\uhhhh \\Uhhhhhhhh``, octal ``\\012``;
* ``\\d \\w \\s`` (ASCII ``[0-9]``, ``[a-zA-Z0-9_]``, ``[ \\t\\n\\r\\f\\v]``) and their negations ``\\D \\W \\S``;
* classes ``[abc]``, ranges ``[a-z]``, negated ``[^...]``, escapes inside them (``\\b`` is a backspace there);
* groups ``(...)``, ``(?:...)``, ``(?P<name>...)``, comments ``(?#...)``; alternation ``|``;
* quantifiers ``* + ? {m} {m,} {,n} {m,n}``, and their lazy forms (``*?`` ...: for a whole match the same
  strings);
* ``^`` as the first and ``$`` as the last character (no-ops: the match is whole anyway).

Not supported, each with an ``UnsupportedError`` that names it and its position: backreferences, lookahead and
lookbehind, word boundaries and other anchors, inline flags, atomic groups, possessive quantifiers,
conditionals. A pattern that is not a valid regex raises ``SlmError``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SlmError, UnsupportedError
from .charset import ANY, DIGIT, SPACE, WORD, CharSet

SUPPORTED = ("literals, escapes, \\d \\w \\s, classes [...], ., groups (...) (?:...), alternation |, "
             "quantifiers * + ? {m,n}")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE}
_META = set("\\.^$|?*+()[]{}")


# ---- the tree -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chars:
    """One character out of a set."""
    chars: CharSet


@dataclass(frozen=True)
class Concat:
    """The items one after the other (no items: the empty string)."""
    items: tuple


@dataclass(frozen=True)
class Alternate:
    """Any one of the options."""
    options: tuple


@dataclass(frozen=True)
class Repeat:
    """``item`` between ``low`` and ``high`` times (``high`` None: no limit)."""
    item: object
    low: int
    high: int | None


EMPTY = Concat(())


def literal(text: str) -> Concat:
    """The tree that matches exactly ``text``."""
    return Concat(tuple(Chars(CharSet.chars(c)) for c in text))


# ---- parsing ------------------------------------------------------------------------------------
def parse_regex(pattern: str):
    """The syntax tree of ``pattern`` (see the module doc for the subset)."""
    if not isinstance(pattern, str):
        raise SlmError(f"a regex must be a string, got {pattern!r}")
    return _Parser(pattern).parse()


def _unsupported(what: str, at: int) -> UnsupportedError:
    return UnsupportedError(f"regex: {what} at position {at} is not supported (supported: {SUPPORTED})")


class _Parser:
    def __init__(self, pattern: str):
        self.text, self.at = pattern, 0

    def error(self, message: str, at: int | None = None) -> SlmError:
        return SlmError(f"regex {self.text!r} is not valid: {message} at position {self.at if at is None else at}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.at:self.at + n]

    def take(self) -> str:
        c = self.text[self.at]
        self.at += 1
        return c

    def parse(self):
        start, end = 0, len(self.text)
        if self.text.startswith("^"):
            start = 1
        if self.text.endswith("$") and not _escaped(self.text, end - 1) and end - 1 >= start:
            end -= 1
        self.text, self.at = self.text[:end], start
        tree = self.alternation()
        if self.at < len(self.text):  # only an unmatched ')' stops the top level early
            raise self.error("unbalanced parenthesis")
        return tree

    def alternation(self):
        options = [self.sequence()]
        while self.peek() == "|":
            self.take()
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alternate(tuple(options))

    def sequence(self):
        items: list = []
        while self.at < len(self.text) and self.peek() not in "|)":
            here = self.at
            c = self.peek()
            if c in "*+?" or (c == "{" and self.repeat_bounds() is not None):
                low, high = self.quantifier()
                if not items:
                    raise self.error("nothing to repeat", here)
                if isinstance(items[-1], _Repeated):
                    raise self.error("multiple repeat", here)
                items[-1] = _Repeated(Repeat(items[-1], low, high))
                continue
            items.append(self.atom())
        items = [i.node if isinstance(i, _Repeated) else i for i in items if i is not _SKIP]
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def repeat_bounds(self):
        """``(low, high, length)`` when the text at ``{`` is a repeat count (else ``{`` is a literal)."""
        i, text = self.at + 1, self.text
        if text[i:i + 1] == "}":
            return None
        j = i
        while j < len(text) and text[j].isdigit():
            j += 1
        lo = text[i:j]
        hi = lo
        if text[j:j + 1] == ",":
            k = j + 1
            while k < len(text) and text[k].isdigit():
                k += 1
            hi, j = text[j + 1:k], k
        if text[j:j + 1] != "}":
            return None
        return int(lo) if lo else 0, int(hi) if hi else None, j + 1 - self.at

    def quantifier(self):
        here = self.at
        c = self.peek()
        if c == "{":
            low, high, length = self.repeat_bounds()
            self.at += length
            if high is not None and high < low:
                raise self.error("min repeat greater than max repeat", here)
        else:
            self.take()
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if self.peek() == "?":
            self.take()  # lazy: the same whole matches
        elif self.peek() == "+":
            raise _unsupported("possessive quantifier", self.at)
        return low, high

    def atom(self):
        here = self.at
        c = self.take()
        if c == "(":
            return self.group(here)
        if c == "[":
            return Chars(self.char_class(here))
        if c == ".":
            return Chars(ANY.minus(CharSet.chars("\n")))
        if c == "\\":
            return self.escape(here, in_class=False)
        if c in "^$":
            raise _unsupported(f"anchor {c!r} (only as the first / last character)", here)
        if c == ")":
            raise self.error("unbalanced parenthesis", here)
        return Chars(CharSet.chars(c))

    def group(self, here: int):
        if self.peek() == "?":
            self.take()
            kind = self.peek()
            if kind == ":":
                self.take()
            elif kind == "#":
                end = self.text.find(")", self.at)
                if end < 0:
                    raise self.error("missing ), unterminated comment", here)
                self.at = end + 1
                return _SKIP
            elif self.peek(2) == "P<":
                end = self.text.find(">", self.at)
                name = self.text[self.at + 2:end] if end > 0 else ""
                if not name.isidentifier():
                    raise self.error("bad group name", here)
                self.at = end + 1
            elif self.peek(2) == "P=":
                raise _unsupported("backreference (?P=...)", here)
            elif kind in "=!":
                raise _unsupported(f"lookahead (?{kind}...)", here)
            elif self.peek(2) in ("<=", "<!"):
                raise _unsupported(f"lookbehind (?{self.peek(2)}...)", here)
            elif kind == ">":
                raise _unsupported("atomic group (?>...)", here)
            elif kind == "(":
                raise _unsupported("conditional group (?(...)...)", here)
            elif kind and (kind.isalpha() or kind == "-"):
                raise _unsupported("inline flags (?...)", here)
            else:
                raise self.error("unknown extension", here)
        inner = self.alternation()
        if self.peek() != ")":
            raise self.error("missing ), unterminated subpattern", here)
        self.take()
        return inner

    def char_class(self, here: int) -> CharSet:
        negate = self.peek() == "^"
        if negate:
            self.take()
        chars = CharSet()
        first = True
        while True:
            if self.at >= len(self.text):
                raise self.error("unterminated character set", here)
            at = self.at
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            item = self.escape(at, in_class=True) if c == "\\" else CharSet.chars(c)
            if self.peek() == "-" and self.text[self.at + 1:self.at + 2] not in ("]", ""):
                self.take()
                end_at = self.at
                d = self.take()
                end = self.escape(end_at, in_class=True) if d == "\\" else CharSet.chars(d)
                if item.size() != 1 or end.size() != 1 or len(item.ranges) != 1 or len(end.ranges) != 1:
                    raise self.error("bad character range", at)
                lo, hi = item.ranges[0][0], end.ranges[0][0]
                if lo > hi:
                    raise self.error("bad character range", at)
                item = CharSet.of([(lo, hi)])
            chars = chars.union(item)
        return chars.negate() if negate else chars

    def escape(self, here: int, in_class: bool):
        """The escape after a backslash: a CharSet inside a class, a tree node outside."""
        if self.at >= len(self.text):
            raise self.error("bad escape (end of pattern)", here)
        c = self.take()
        out: CharSet
        if c in _CLASS_ESCAPES or c.lower() in _CLASS_ESCAPES:
            base = _CLASS_ESCAPES[c.lower()]
            out = base if c.islower() else base.negate()
        elif c in _SIMPLE_ESCAPES:
            out = CharSet.chars(_SIMPLE_ESCAPES[c])
        elif c == "b" and in_class:
            out = CharSet.chars("\b")
        elif c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.text[self.at:self.at + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"incomplete escape \\{c}{digits}", here)
            self.at += width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self.error(f"bad escape \\{c}{digits}", here)
            out = CharSet.of([(code, code)])
        elif c == "0" or (c in "1234567" and (in_class or _octal(self.text[self.at:self.at + 2]))):
            digits = c
            while len(digits) < 3 and self.peek() and self.peek() in "01234567":
                digits += self.take()
            if int(digits, 8) > 0o377:
                raise self.error(f"octal escape value \\{digits} outside of range 0-0o377", here)
            out = CharSet.of([(int(digits, 8), int(digits, 8))])
        elif c.isdigit():
            raise _unsupported(f"backreference \\{c}", here)
        elif c in "bBAZ":
            raise _unsupported(f"anchor \\{c}", here)
        elif c == "N":
            raise _unsupported("named character \\N{...}", here)
        elif c.isascii() and c.isalpha():
            raise self.error(f"bad escape \\{c}", here)
        else:
            out = CharSet.chars(c)
        return out if in_class else Chars(out)


@dataclass(frozen=True)
class _Repeated:
    """A parsed item that already carries a quantifier (a second one is an error, as in ``re``)."""
    node: object


_SKIP = Concat(())  # a comment group: parsed, then dropped


def _octal(text: str) -> bool:
    """Whether ``text`` is two octal digits (after a backslash and a third: an octal escape, not a group)."""
    return len(text) == 2 and all(d in "01234567" for d in text)


def _escaped(text: str, i: int) -> bool:
    """Whether ``text[i]`` is preceded by an odd number of backslashes."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


# ---- printing -----------------------------------------------------------------------------------
def regex_escape(text: str) -> str:
    """``text`` as a pattern that matches exactly it."""
    return "".join(_char(c) for c in text)


def _char(c: str, in_class: bool = False) -> str:
    code = ord(c)
    if c in _META or (in_class and c in "-^"):
        return "\\" + c
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if code > 0x7F and not c.isprintable():
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return c


def to_pattern(node) -> str:
    """A pattern string for a tree (``parse_regex(to_pattern(t))`` matches what ``t`` matches)."""
    if isinstance(node, Chars):
        ranges = node.chars.ranges
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
            return _char(chr(ranges[0][0]))
        if not ranges:
            return "[^\\x00-\\U0010ffff]"  # matches nothing
        inside = "".join(_char(chr(lo), True) if lo == hi else f"{_char(chr(lo), True)}-{_char(chr(hi), True)}"
                         for lo, hi in ranges)
        return f"[{inside}]"
    if isinstance(node, Concat):
        return "".join(_grouped(item, Alternate) for item in node.items)
    if isinstance(node, Alternate):
        return "|".join(to_pattern(option) for option in node.options)
    if isinstance(node, Repeat):
        low, high = node.low, node.high
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
        if suffix is None:
            suffix = f"{{{low}}}" if low == high else f"{{{low},{'' if high is None else high}}}"
        return _grouped(node.item, (Alternate, Concat, Repeat)) + suffix
    raise TypeError(f"not a regex tree node: {node!r}")


def _grouped(node, kinds) -> str:
    while isinstance(node, Concat) and len(node.items) == 1:
        node = node.items[0]
    text = to_pattern(node)
    return f"(?:{text})" if isinstance(node, kinds) else text
