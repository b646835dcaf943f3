"""Constrained decoding: generated text that matches a regex or a JSON schema.

A constraint compiles to a DFA over UTF-8 bytes (``regex`` -> ``automaton``; JSON schemas go through
``schema`` to a regex first). ``mask`` turns DFA states into token masks over the model's vocabulary and
applies them as a logits processor (``engine.sampling``). ``constraint`` ties these together and caches them.

    from slmkit.engine.constrain import json_schema_constraint
    c = json_schema_constraint({"type": "object", "properties": {"x": {"type": "integer"}}})
    lm.generate(prompt, logits_processors=[c.processor(lm.tokenizer, lm.eos_ids)])
    # or simply: lm.generate(prompt, json_schema={...}) / lm.generate(prompt, regex="...")
"""

from .automaton import DFA, compile_dfa
from .constraint import (Constraint, ConstraintCache, json_object_constraint, json_schema_constraint,
                         regex_constraint, response_format_constraint)
from .mask import ConstrainedLogits, TokenMasks, Vocabulary, vocabulary_of
from .regex import parse_regex, regex_escape, to_pattern
from .schema import json_object_regex, json_value_regex, schema_to_regex

__all__ = ["ConstrainedLogits", "Constraint", "ConstraintCache", "DFA", "TokenMasks", "Vocabulary", "compile_dfa",
           "json_object_constraint", "json_object_regex", "json_schema_constraint", "json_value_regex",
           "parse_regex", "regex_constraint", "regex_escape", "response_format_constraint", "schema_to_regex",
           "to_pattern", "vocabulary_of"]
