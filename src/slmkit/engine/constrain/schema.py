"""JSON schema -> a regex (see ``regex``) that matches JSON texts valid under the schema.

Output shape (the whitespace policy): compact JSON with at most one space after each ``:`` and ``,``, and no
other whitespace -- no newlines, no indentation, nothing before or after the value. Objects list their
properties in the schema's order; a property not in ``required`` may be left out. Strings are written with
JSON escapes where they need them (``\\"``, ``\\\\``, ``\\n``, ``\\u00XX`` ...), and ``maxLength`` / ``minLength``
count characters, as JSON schema does. Numbers have at most 16 integer digits, 16 fraction digits and a
2-digit exponent (as llama.cpp's grammars do), so that every number ends; numbers inside free-form values
(below) have no digit limit.

Supported keywords: ``type`` (one or a list of ``object array string number integer boolean null``), ``enum``,
``const``; objects: ``properties``, ``required``, ``additionalProperties`` (with properties: extra properties
are never written; without: ``false`` -> ``{}``, a schema -> any keys with such values, absent or ``true`` ->
any JSON object); arrays: ``items`` (absent: any values), ``minItems``, ``maxItems``; strings: ``minLength``,
``maxLength``, ``pattern`` (the regex subset of ``regex``; the whole string matches it). Annotations
(``title``, ``description``, ``default``, ``examples``, ``$schema``, ...) and keywords this module does not know
are ignored, as JSON schema says. A schema of any JSON value (``{}``, ``true``, an object without properties)
nests at most ``GENERIC_DEPTH`` levels deep. Every keyword that would restrict values in a way this module
cannot express raises ``UnsupportedError`` naming the keyword and where it is (``$.properties.x``).
"""

from __future__ import annotations

import json
from numbers import Integral

from ...errors import SlmError, UnsupportedError
from .charset import CharSet
from .regex import Alternate, Chars, Concat, Repeat, literal, parse_regex, regex_escape, to_pattern

GENERIC_DEPTH = 3  # nesting levels of a free-form JSON value
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
SUPPORTED = ("type, enum, const, properties, required, additionalProperties, items, minItems, maxItems, "
             "minLength, maxLength, pattern")
UNSUPPORTED = ("$ref", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "patternProperties",
               "propertyNames", "dependentRequired", "dependentSchemas", "dependencies", "minProperties",
               "maxProperties", "unevaluatedProperties", "unevaluatedItems", "prefixItems", "additionalItems",
               "contains", "minContains", "maxContains", "uniqueItems", "format", "minimum", "maximum",
               "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "contentEncoding", "contentMediaType",
               "contentSchema", "$dynamicRef", "$recursiveRef")
_TYPE_HINTS = {"object": ("properties", "required", "additionalProperties"),
               "array": ("items", "minItems", "maxItems"),
               "string": ("pattern", "minLength", "maxLength")}

COLON, COMMA = ": ?", ", ?"
# one character of a JSON string: anything but '"', '\' and control characters, or an escape (no \u
# surrogates: a pair would count as one character and break minLength)
STRING_CHAR = (r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]'
               r'|\\u(?:[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))')
INTEGER = r"-?(?:0|[1-9][0-9]{0,15})"
NUMBER = INTEGER + r"(?:\.[0-9]{1,16})?(?:[eE][+-]?[0-9]{1,2})?"
STRING = f'"{STRING_CHAR}*"'
FREE_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"  # in free-form values: no digit limit
_NEEDS_ESCAPE = CharSet.chars('"\\').union(CharSet.of([(0, 0x1F)]))


def schema_to_regex(schema) -> str:
    """A regex matching the compact JSON texts that ``schema`` (a dict, or ``True``) accepts."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise SlmError(f"json schema is not valid JSON: {exc}") from None
    return _value(schema, "$")


def json_value_regex(depth: int = GENERIC_DEPTH) -> str:
    """Any JSON value nested at most ``depth`` levels deep (depth 0: a string, number, boolean or null)."""
    scalar = f"(?:{STRING}|{FREE_NUMBER}|true|false|null)"
    value = scalar
    for _ in range(depth):
        value = f"(?:{scalar}|{_free_object(value)}|{_free_array(value)})"
    return value


def json_object_regex(depth: int = GENERIC_DEPTH) -> str:
    """Any JSON object nested at most ``depth`` levels deep (what OpenAI's ``json_object`` format asks for)."""
    return _free_object(json_value_regex(depth - 1))


def _free_object(value: str) -> str:
    member = f"{STRING}{COLON}{value}"
    return rf"\{{(?:{member}(?:{COMMA}{member})*)?\}}"


def _free_array(value: str) -> str:
    return rf"\[(?:{value}(?:{COMMA}{value})*)?\]"


def _unsupported(key: str, path: str) -> UnsupportedError:
    return UnsupportedError(f"json schema: {key!r} at {path} is not supported (supported: {SUPPORTED})")


def _value(schema, path: str) -> str:
    if schema is True:
        return json_value_regex()
    if schema is False:
        raise SlmError(f"json schema: the schema at {path} is false, so no value is valid")
    if not isinstance(schema, dict):
        raise SlmError(f"json schema: the schema at {path} must be an object (or true), got {schema!r}")
    for key in UNSUPPORTED:
        if key in schema:
            raise _unsupported(key, path)
    if "const" in schema:
        return _literals([schema["const"]], schema, path)
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SlmError(f"json schema: 'enum' at {path} must be a non-empty list")
        return _literals(values, schema, path)
    types = _types(schema, path)
    if types is None:
        return json_value_regex()
    options = [_TYPED[t](schema, path) for t in types]
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _types(schema: dict, path: str) -> list[str] | None:
    kind = schema.get("type")
    if kind is None:  # inferred from the keywords, else any value
        hinted = [t for t, keys in _TYPE_HINTS.items() if any(k in schema for k in keys)]
        return hinted[:1] or None
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        if k not in TYPES:
            raise UnsupportedError(f"json schema: type {k!r} at {path} is not supported (supported: "
                                   f"{', '.join(TYPES)})")
    if not kinds:
        raise SlmError(f"json schema: 'type' at {path} is an empty list")
    return list(dict.fromkeys(kinds))


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Integral):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "unknown")


def _literals(values: list, schema: dict, path: str) -> str:
    """``enum`` / ``const``: exactly these values (those of the schema's ``type``, when it has one)."""
    types = _types(schema, path) if "type" in schema else None
    if types is not None:
        allowed = set(types) | ({"integer"} if "number" in types else set())
        values = [v for v in values if _json_type(v) in allowed]
        if not values:
            raise SlmError(f"json schema: no value of 'enum' / 'const' at {path} has the type {schema['type']!r}")
    try:
        options = list(dict.fromkeys(_literal(v) for v in values))
    except (TypeError, ValueError) as exc:
        raise SlmError(f"json schema: 'enum' / 'const' at {path} holds a value that is not JSON: {exc}") from None
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def _literal(value) -> str:
    """A regex for exactly ``value`` written as JSON, with the optional spaces of the whitespace policy."""
    if isinstance(value, dict):
        members = [f"{regex_escape(json.dumps(str(k), ensure_ascii=False))}{COLON}{_literal(v)}"
                   for k, v in value.items()]
        return r"\{" + COMMA.join(members) + r"\}"
    if isinstance(value, (list, tuple)):
        return r"\[" + COMMA.join(_literal(v) for v in value) + r"\]"
    return regex_escape(json.dumps(value, ensure_ascii=False, allow_nan=False))


def _count(schema: dict, key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise SlmError(f"json schema: {key!r} at {path} must be an integer >= 0, got {value!r}")
    return int(value)


def _repeat(low: int, high: int | None) -> str:
    if high is None:
        return "*" if low == 0 else f"{{{low},}}"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"


def _object(schema: dict, path: str) -> str:
    props = schema.get("properties") or {}
    if not isinstance(props, dict):
        raise SlmError(f"json schema: 'properties' at {path} must be an object")
    required = schema.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SlmError(f"json schema: 'required' at {path} must be a list of property names")
    missing = [r for r in required if r not in props]
    if missing:
        raise UnsupportedError(f"json schema: required property {missing[0]!r} at {path} has no entry in "
                               "'properties' (list every required property there)")
    extra = schema.get("additionalProperties")
    if not props:
        if extra is False:
            return r"\{\}"
        if extra is None or extra is True:
            return json_object_regex()
        return _free_object(_value(extra, f"{path}.additionalProperties"))
    members = [(f"{regex_escape(json.dumps(name, ensure_ascii=False))}{COLON}"
                f"{_value(sub, f'{path}.properties.{name}')}", name in required) for name, sub in props.items()]
    n = len(members)
    after = [""] * (n + 1)  # members i.. once one member has been written (each then starts with a comma)
    fresh = [""] * (n + 1)  # members i.. while none has been written yet
    for i in reversed(range(n)):
        member, needed = members[i]
        after[i] = (f"{COMMA}{member}" if needed else f"(?:{COMMA}{member})?") + after[i + 1]
        fresh[i] = member + after[i + 1] if needed else f"(?:{member}{after[i + 1]}|{fresh[i + 1]})"
    return rf"\{{{fresh[0]}\}}"


def _array(schema: dict, path: str) -> str:
    items = schema.get("items")
    if isinstance(items, list):
        raise _unsupported("items (a list of schemas)", path)
    item = json_value_regex(GENERIC_DEPTH - 1) if items is None else _value(items, f"{path}.items")
    low, high = _count(schema, "minItems", path) or 0, _count(schema, "maxItems", path)
    if high is not None and high < low:
        raise SlmError(f"json schema: 'maxItems' at {path} is smaller than 'minItems'")
    if high == 0:
        return r"\[\]"
    if low == 0:
        return rf"\[(?:{item}(?:{COMMA}{item}){_repeat(0, None if high is None else high - 1)})?\]"
    return rf"\[{item}(?:{COMMA}{item}){_repeat(low - 1, None if high is None else high - 1)}\]"


def _string(schema: dict, path: str) -> str:
    low, high = _count(schema, "minLength", path) or 0, _count(schema, "maxLength", path)
    if high is not None and high < low:
        raise SlmError(f"json schema: 'maxLength' at {path} is smaller than 'minLength'")
    if "pattern" in schema:
        if low or high is not None:
            raise _unsupported("pattern (together with minLength / maxLength)", path)
        pattern = schema["pattern"]
        if not isinstance(pattern, str):
            raise SlmError(f"json schema: 'pattern' at {path} must be a string")
        try:
            tree = parse_regex(pattern)
        except SlmError as exc:
            raise type(exc)(f"json schema: 'pattern' at {path}: {exc}") from None
        return f'"(?:{to_pattern(json_escaped(tree))})"'
    return f'"{STRING_CHAR}{_repeat(low, high)}"'


def json_escaped(tree):
    """The tree matching the JSON string bodies (between the quotes) that spell what ``tree`` matches."""
    if isinstance(tree, Chars):
        plain = tree.chars.minus(_NEEDS_ESCAPE)
        special = tree.chars.intersect(_NEEDS_ESCAPE)
        options = [Chars(plain)] if plain else []
        for lo, hi in special.ranges:
            options += [literal(json.dumps(chr(c))[1:-1]) for c in range(lo, hi + 1)]
        if not options:
            return tree  # the empty set: matches nothing either way
        return options[0] if len(options) == 1 else Alternate(tuple(options))
    if isinstance(tree, Concat):
        return Concat(tuple(json_escaped(item) for item in tree.items))
    if isinstance(tree, Alternate):
        return Alternate(tuple(json_escaped(option) for option in tree.options))
    if isinstance(tree, Repeat):
        return Repeat(json_escaped(tree.item), tree.low, tree.high)
    raise TypeError(f"not a regex tree node: {tree!r}")


_TYPED = {
    "object": _object,
    "array": _array,
    "string": _string,
    "number": lambda schema, path: NUMBER,
    "integer": lambda schema, path: INTEGER,
    "boolean": lambda schema, path: "(?:true|false)",
    "null": lambda schema, path: "null",
}
