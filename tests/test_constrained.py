"""Constrained decoding (engine.constrain): the regex compiler against Python's ``re``, JSON schemas against a
validator, token masks against a brute-force walk of the vocabulary, and the real SmolLM2 generating under
random schemas, through the Python API and the HTTP server."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

import slmkit
from slmkit.engine.constrain import (compile_dfa, json_schema_constraint, parse_regex, regex_constraint,
                                     schema_to_regex, to_pattern)
from slmkit.engine.constrain.regex import Alternate, Chars, Concat, Repeat
from slmkit.errors import SlmError, UnsupportedError


# ------------------------------------------------------------------------------------ random regexes
ALPHABET = "ab1_ .-\né中😀A\t"
ATOMS = ["a", "b", "1", "é", "中", "😀", r"\.", r"\-", " ", ".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S",
         "[a-c]", "[^ab]", r"[\d_]", "[é-ü]", r"[^\s]", "[ab.]", r"\x41", r"\u00e9", r"[\n\t]", "[-a]", "[]a]"]
QUANTIFIERS = ["*", "+", "?", "{2}", "{1,3}", "{2,}", "{,2}", "*?", "+?", "??"]


def random_regex(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.25 and depth < 2:
            inner = "|".join(random_regex(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            atom = rng.choice(["(", "(?:"]) + inner + ")"
        else:
            atom = rng.choice(ATOMS)
        if rng.random() < 0.35:
            atom += rng.choice(QUANTIFIERS)
        parts.append(atom)
    return "".join(parts)


def sample_match(tree, rng: random.Random) -> str:
    """A text the tree matches (repeats kept short)."""
    if isinstance(tree, Chars):
        lo, hi = rng.choice(tree.chars.ranges)
        hi = min(hi, lo + 300)
        return chr(rng.randint(lo, hi))
    if isinstance(tree, Concat):
        return "".join(sample_match(t, rng) for t in tree.items)
    if isinstance(tree, Alternate):
        return sample_match(rng.choice(tree.options), rng)
    if isinstance(tree, Repeat):
        high = tree.low + 3 if tree.high is None else tree.high
        return "".join(sample_match(tree.item, rng) for _ in range(rng.randint(tree.low, high)))
    raise TypeError(tree)


def mutate(text: str, rng: random.Random) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 2)):
        op = rng.randrange(3)
        at = rng.randint(0, len(chars))
        if op == 0:
            chars.insert(at, rng.choice(ALPHABET))
        elif chars and at < len(chars):
            if op == 1:
                del chars[at]
            else:
                chars[at] = rng.choice(ALPHABET)
    return "".join(chars)


def test_regex_compiler_agrees_with_python_re():
    rng = random.Random(1234)
    checked = matched = too_large = 0
    for _ in range(300):
        pattern = random_regex(rng)
        tree = parse_regex(pattern)
        try:
            dfa = compile_dfa(tree)
        except UnsupportedError as exc:  # a DFA can be exponentially larger than its regex
            assert "too large" in str(exc)
            too_large += 1
            continue
        printed = to_pattern(tree)  # the printer writes a pattern that means the same (to Python's re too)
        assert to_pattern(parse_regex(printed)) == printed
        texts = [sample_match(tree, rng) for _ in range(6)]
        texts += [mutate(t, rng) for t in texts]
        texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(6)] + [""]
        for text in texts:
            expected = re.fullmatch(pattern, text, re.ASCII) is not None
            got = dfa.matches(text.encode("utf-8"))
            assert got == expected, f"{pattern!r} on {text!r}: dfa {got}, re {expected}"
            assert (re.fullmatch(printed, text, re.ASCII) is not None) == expected, f"{printed!r} on {text!r}"
            checked += 1
            matched += expected
    assert too_large <= 3
    assert checked > 5000 and matched > checked // 4  # both outcomes are well represented


@pytest.mark.parametrize("pattern, names", [
    (r"(a)\1", "backreference"), (r"(?P<x>a)(?P=x)", "backreference"), ("a(?=b)", "lookahead"),
    ("a(?<!b)", "lookbehind"), (r"\bword", "anchor \\b"), ("(?i)abc", "inline flags"), ("a*+", "possessive"),
    ("a^b", "anchor '^'"), ("(?>a)", "atomic group"),
])
def test_unsupported_regex_features_are_named(pattern, names):
    with pytest.raises(UnsupportedError) as info:
        regex_constraint(pattern)
    assert names in str(info.value) and "not supported" in str(info.value)


@pytest.mark.parametrize("pattern", ["(a", "a)", "[a", "a**", "*a", r"\q", "[z-a]", "a{3,1}"])
def test_invalid_regexes_are_errors(pattern):
    with pytest.raises(SlmError):
        regex_constraint(pattern)
    with pytest.raises(re.error):
        re.compile(pattern)


def test_anchors_at_the_ends_and_max_bytes():
    c = regex_constraint(r"^\d{2,4}-[a-z]$")
    assert c.matches("123-x") and not c.matches("1-x")
    assert c.max_bytes() == 6
    assert regex_constraint("a+").max_bytes() is None


# ----------------------------------------------------------------------------- random JSON schemas
NAMES = ["name", "age", "city", "email", "tags", "score", "active", "id", "title", "color"]
PATTERNS = ["[a-z]{1,8}", "[A-Z][a-z]{0,6}", r"\d{3}-\d{4}", "(red|green|blue)", r"[a-z]{1,6}@[a-z]{2,5}\.(com|org)",
            r'[a-z"\\]{1,4}']
ENUM_VALUES = ["a", "b c", "é", 1, 2.5, True, False, None, "quote\"d"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "string", "pattern", "string_enum", "integer", "number", "boolean", "null", "enum",
             "nullable"]
    if depth < 2:
        kinds += ["array", "object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        schema = {"type": "string", "maxLength": rng.randint(1, 12)}
        if rng.random() < 0.3:
            schema["minLength"] = rng.randint(0, schema["maxLength"])
        return schema
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "string_enum":
        return {"type": "string", "enum": rng.sample(["small", "medium", "large", "x-large", "ünï"], 3)}
    if kind == "enum":
        return {"enum": rng.sample(ENUM_VALUES, rng.randint(1, 4))}
    if kind == "nullable":
        return {"type": ["string", "null"], "maxLength": rng.randint(1, 8)}
    if kind in ("integer", "number", "boolean", "null"):
        return {"type": kind, "description": "ignored"}
    if kind == "array":
        schema = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
        if rng.random() < 0.5:
            schema["minItems"] = rng.randint(0, schema["maxItems"])
        return schema
    names = rng.sample(NAMES, rng.randint(1, 3))
    schema = {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
              "required": [n for n in names if rng.random() < 0.6]}
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def json_type_ok(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"string": str, "boolean": bool, "null": type(None), "array": list, "object": dict}[kind] == type(value)


def same(a, b) -> bool:
    return type(a) is type(b) and a == b or (json_type_ok(a, "number") and json_type_ok(b, "number") and a == b)


def validate(value, schema: dict, path: str = "$") -> None:
    """An assertion-raising validator for the subset the random schemas use."""
    if "enum" in schema:
        assert any(same(value, e) for e in schema["enum"]), f"{path}: {value!r} not in enum"
    kinds = schema.get("type")
    if kinds is None:
        return
    kinds = kinds if isinstance(kinds, list) else [kinds]
    assert any(json_type_ok(value, k) for k in kinds), f"{path}: {value!r} is not {kinds}"
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10 ** 9), f"{path}: length"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10 ** 9), f"{path}: items"
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{path}: {name!r} is required"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra properties {set(value) - set(props)}"
        for name, item in value.items():
            if name in props:
                validate(item, props[name], f"{path}.{name}")


def test_schema_regex_accepts_valid_and_rejects_invalid_json():
    rng = random.Random(7)
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 5}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "[a-z]+"}, "minItems": 1, "maxItems": 2},
        "kind": {"enum": ["a", 1, None, {"x": [1]}]}, "ok": {"type": ["boolean", "null"]}},
        "required": ["name", "tags"], "additionalProperties": False}
    c = json_schema_constraint(schema)
    good = [{"name": "Bo", "tags": ["x"]}, {"name": 'a"\\\n', "age": -12, "tags": ["ab", "c"], "kind": None},
            {"name": "中文", "tags": ["q"], "kind": {"x": [1]}, "ok": False}, {"name": "", "tags": ["z"], "ok": None}]
    for value in good:
        for separators in ((",", ":"), (", ", ": ")):
            assert c.matches(json.dumps(value, ensure_ascii=False, separators=separators)), value
        assert c.matches(json.dumps(value, separators=(",", ":")))  # \u escapes too
    bad = ['{"tags": ["x"]}', '{"name": "abcdef", "tags": ["x"]}', '{"name": "a", "tags": []}',
           '{"name": "a", "tags": ["X"]}', '{"tags": ["x"], "name": "a"}', '{"name": "a", "tags": ["x"], "z": 1}',
           '{"name": "a", "tags": ["x"], "age": 1.5}', '{"name":"a","tags":["x"]} ', '{"name":  "a","tags":["x"]}',
           '{"name": "a", "tags": ["x"], "kind": 2}']
    for text in bad:
        assert not c.matches(text), text
    for _ in range(150):  # random schemas: what the regex accepts is valid (sampled from the regex itself)
        schema = random_schema(rng)
        c = json_schema_constraint(schema)
        tree = parse_regex(c.pattern)
        for _ in range(5):
            text = sample_match(tree, rng)
            validate(json.loads(text), schema)
            assert c.matches(text)


@pytest.mark.parametrize("schema, names", [
    ({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}]}}}, "'anyOf' at $.properties.x"),
    ({"$ref": "#/$defs/a"}, "'$ref' at $"),
    ({"type": "array", "items": {"oneOf": []}}, "'oneOf' at $.items"),
    ({"type": "string", "format": "date-time"}, "'format' at $"),
    ({"type": "integer", "minimum": 0}, "'minimum' at $"),
    ({"type": "object", "patternProperties": {"a": {}}}, "'patternProperties' at $"),
    ({"type": "decimal"}, "type 'decimal' at $"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(a)\\1"}}}, "backreference"),
])
def test_unsupported_schema_features_are_named(schema, names):
    with pytest.raises(UnsupportedError) as info:
        schema_to_regex(schema)
    assert names in str(info.value) and "not supported" in str(info.value)


def test_free_form_json():
    from slmkit.engine.constrain import json_object_constraint
    c = json_object_constraint()
    assert c.matches('{"a": [1, {"b": null}], "c": "d"}') and c.matches("{}")
    assert not c.matches("[1]") and not c.matches('{"a": [[[[1]]]]}')  # depth is bounded
    assert json_schema_constraint({}).matches("12.5e3") and json_schema_constraint(True).matches('["x"]')
    assert json_schema_constraint({"type": "object"}).matches('{"k": true}')
    assert json_schema_constraint({"type": "object", "additionalProperties": {"type": "integer"}}).matches('{"a": 1}')


# --------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    return slmkit.load(smollm2_gguf)


PROMPTS = ["Give me a JSON object describing a person.", "Describe a city as JSON.",
           "Write JSON for a book in a library catalogue.", "Answer in JSON: what is your favourite colour?",
           "Give me a JSON record of a pet.", "Produce a JSON object about a car.",
           "Describe the weather today as JSON.", "JSON for a movie please.",
           "Make a JSON object describing a fruit.", "Give me a JSON object for a song."]


@pytest.mark.slow
def test_mask_matches_brute_force_on_the_real_vocabulary(lm):
    c = json_schema_constraint({"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                                 "n": {"type": "number"}}, "required": ["name"]})
    masks = c.masks(lm.tokenizer, lm.eos_ids)
    token_bytes = lm.tokenizer.token_bytes()
    dfa = c.dfa
    states = {prefix: dfa.step(0, prefix.encode()) for prefix in ("", '{"name": "Al', '{"name": "中', '{"name":"x","n":1')}
    states['{"name": "\\xe4'] = dfa.step(0, '{"name": "ä'.encode()[:-1])  # inside a two-byte character
    for prefix, state in states.items():
        assert state != dfa.dead, prefix
        allowed = set(masks.allowed(state).tolist())
        for token, data in enumerate(token_bytes):
            if token in lm.eos_ids:
                assert (token in allowed) == bool(dfa.accepting[state])
            elif data is None:
                assert token not in allowed, f"special token {token} allowed"
            else:
                live = dfa.step(state, data) != dfa.dead
                assert (token in allowed) == live, f"state after {prefix!r}: token {token} {data!r}"
        assert len(allowed) > 0
    assert len(masks.allowed(states[""])) < 100 < len(masks.allowed(states['{"name": "Al']))


def random_object(rng: random.Random) -> dict:
    """An object schema of 1-4 random properties (what the prompts ask for)."""
    names = rng.sample(NAMES, rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, 1) for n in names},
            "required": [n for n in names if rng.random() < 0.7]}


class PerRow:
    """A logits processor that runs a different processor on each row (each sees a batch of one)."""

    def __init__(self, processors):
        self.processors = processors

    def __call__(self, logits, context):
        for i, (proc, ids) in enumerate(zip(self.processors, context)):
            logits[i:i + 1] = proc(logits[i:i + 1], [ids])
        return logits


@pytest.mark.slow
def test_200_generations_under_random_schemas_all_validate(lm):
    """10 batches of 20 rows, each row its own random schema and prompt; half greedy, half sampled. Every
    output parses and validates, and ends by itself (max_new_tokens covers the longest text allowed)."""
    rng = random.Random(2024)
    failures, finished = [], 0
    for batch in range(10):
        schemas = [random_schema(rng) if rng.random() < 0.3 else random_object(rng) for _ in range(20)]
        constraints = [json_schema_constraint(s) for s in schemas]
        budget = max(c.max_bytes() for c in constraints) + 1
        processors = [c.processor(lm.tokenizer, lm.eos_ids) for c in constraints]
        chats = [[{"role": "user", "content": rng.choice(PROMPTS)}] for _ in schemas]
        sampling = {} if batch % 2 == 0 else {"temperature": rng.choice([0.7, 1.0]), "seed": batch}
        done = lm.complete_chats(chats, max_new_tokens=budget, logits_processors=[PerRow(processors)], **sampling)
        for schema, completion in zip(schemas, done):
            finished += completion.finish_reason == "stop"
            try:
                validate(json.loads(completion.text), schema)
            except (ValueError, AssertionError) as exc:
                failures.append((schema, completion.text, exc))
    assert not failures, failures[:3]
    assert finished == 200


@pytest.mark.slow
def test_python_api_json_schema_and_regex(lm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    for completion in lm.complete_chats(chats, json_schema=schema, max_new_tokens=60):
        value = json.loads(completion.text)
        validate(value, schema)
        assert completion.finish_reason == "stop"
    text = lm.generate("The date of the moon landing was", regex=r"\d{4}-\d{2}-\d{2}", max_new_tokens=20)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)
    reply = lm.chat([{"role": "user", "content": "Is water wet? Answer yes or no."}], regex="(yes|no)",
                    max_new_tokens=5)
    assert reply in ("yes", "no")
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    assert validate(json.loads(lm.chat(chats[0], response_format=fmt, max_new_tokens=60)), schema) is None
    streamed = "".join(lm.stream("A JSON list of three colours:", json_schema={
        "type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 3, "maxItems": 3},
        max_new_tokens=30))
    assert len(json.loads(streamed)) == 3
    with pytest.raises(UnsupportedError, match="backreference"):
        lm.generate("x", regex=r"(a)\1")
    with pytest.raises(SlmError, match="one of regex="):
        lm.generate("x", regex="a", json_schema={})
    assert lm.constraints.json_schema(schema) is lm.constraints.json_schema(dict(schema))  # compiled once


# ------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(lm):
    import uvicorn

    from slmkit.serve.app import create_app

    app = create_app(lm, model_id="smol", max_batch=8, max_queue=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not web.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.state.server
    web.should_exit = True
    thread.join(30)


def post(base: str, path: str, body: dict):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
def test_server_response_format(server):
    base, state = server
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "population": {"type": "integer"},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "population", "sunny"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    body = {"model": "smol", "messages": [{"role": "user", "content": "Describe a city as JSON."}],
            "response_format": fmt, "max_tokens": 80, "n": 3, "temperature": 0.9, "seed": 3}
    status, out = post(base, "/v1/chat/completions", body)
    assert status == 200, out
    for choice in out["choices"]:
        validate(json.loads(choice["message"]["content"]), schema)
        assert choice["finish_reason"] == "stop"
    status, out = post(base, "/v1/chat/completions", {**body, "n": 1, "temperature": 0, "max_tokens": 200,
                                                      "response_format": {"type": "json_object"}})
    assert status == 200 and isinstance(json.loads(out["choices"][0]["message"]["content"]), dict), out
    status, out = post(base, "/v1/completions", {"model": "smol", "prompt": "The answer (yes or no):",
                                                 "max_tokens": 30, "temperature": 0, "response_format": {
                                                     "type": "json_schema", "json_schema": {"name": "a", "schema": {
                                                         "enum": ["yes", "no"]}}}})
    assert status == 200 and json.loads(out["choices"][0]["text"]) in ("yes", "no"), out
    assert len(state.constraints) == 3  # one compile per distinct format
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}}}}
    status, out = post(base, "/v1/chat/completions", bad)
    assert status == 400 and "'anyOf' at $.properties.x is not supported" in out["error"]["message"], out
    status, out = post(base, "/v1/chat/completions", {**body, "response_format": {"type": "xml"}})
    assert status == 400 and "xml" in out["error"]["message"]
