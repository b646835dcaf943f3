"""Sets of Unicode code points, and the UTF-8 byte sequences that spell them.

A ``CharSet`` is a sorted tuple of disjoint, non-adjacent inclusive ranges ``(lo, hi)`` of code points.
Surrogates (U+D800..U+DFFF) are never part of a set: UTF-8 cannot spell them, so ``negate`` and ``ANY``
leave them out. ``utf8_sequences`` splits a set into byte-range sequences, the way RE2 and Rust's
regex-syntax compile character classes to byte automata: every sequence is a list of ``(lo, hi)`` byte
ranges, one per byte, and a code point is in the set exactly when its UTF-8 encoding matches one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)


@dataclass(frozen=True)
class CharSet:
    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, ranges) -> "CharSet":
        """A set from any ranges (overlapping, unsorted, including surrogates: they are dropped)."""
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if lo > hi:
                continue
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out = []
        for lo, hi in merged:  # cut the surrogates out
            if hi < SURROGATES[0] or lo > SURROGATES[1]:
                out.append((lo, hi))
                continue
            if lo < SURROGATES[0]:
                out.append((lo, SURROGATES[0] - 1))
            if hi > SURROGATES[1]:
                out.append((SURROGATES[1] + 1, hi))
        return cls(tuple(out))

    @classmethod
    def chars(cls, text: str) -> "CharSet":
        return cls.of((ord(c), ord(c)) for c in text)

    def union(self, other: "CharSet") -> "CharSet":
        return CharSet.of(self.ranges + other.ranges)

    def negate(self) -> "CharSet":
        out, at = [], 0
        for lo, hi in self.ranges:
            if lo > at:
                out.append((at, lo - 1))
            at = hi + 1
        if at <= MAX_CODE_POINT:
            out.append((at, MAX_CODE_POINT))
        return CharSet.of(out)

    def minus(self, other: "CharSet") -> "CharSet":
        return self.negate().union(other).negate()

    def intersect(self, other: "CharSet") -> "CharSet":
        return self.negate().union(other.negate()).negate()

    def __contains__(self, code_point: int) -> bool:
        return any(lo <= code_point <= hi for lo, hi in self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)


ANY = CharSet.of([(0, MAX_CODE_POINT)])
DIGIT = CharSet.of([(ord("0"), ord("9"))])
WORD = CharSet.of([(ord("a"), ord("z")), (ord("A"), ord("Z")), (ord("0"), ord("9")), (ord("_"), ord("_"))])
SPACE = CharSet.chars(" \t\n\r\f\v")

_LENGTH_LIMITS = (0x7F, 0x7FF, 0xFFFF, MAX_CODE_POINT)  # the last code point of each UTF-8 length


def utf8_sequences(charset: CharSet) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose union spells exactly the code points of ``charset`` in UTF-8."""
    out: list[list[tuple[int, int]]] = []
    for lo, hi in charset.ranges:
        start = lo
        for limit in _LENGTH_LIMITS:  # one UTF-8 length at a time
            if start > hi:
                break
            if start <= limit:
                end = min(hi, limit)
                _split(start, end, out)
                start = end + 1
    return out


def _split(lo: int, hi: int, out: list) -> None:
    """``lo..hi`` (one UTF-8 length) as byte-range sequences: split until every byte varies independently."""
    for i in (1, 2, 3):
        mask = (1 << (6 * i)) - 1
        if lo & ~mask != hi & ~mask:
            if lo & mask != 0:
                _split(lo, lo | mask, out)
                _split((lo | mask) + 1, hi, out)
                return
            if hi & mask != mask:
                _split(lo, (hi & ~mask) - 1, out)
                _split(hi & ~mask, hi, out)
                return
    first, last = chr(lo).encode("utf-8"), chr(hi).encode("utf-8")
    out.append(list(zip(first, last)))
