"""Requests -> `GrammarSpec`: what constrains a chat or completions output (pure Python, no xgrammar).

OpenAI's `response_format` (text / json_object / json_schema, plus xgrammar's structural_tag) and
SGLang's top-level `regex` / `ebnf` fields become one `GrammarSpec` for `SamplingParams.grammar`.
The scheduler's xgrammar compile is the judge of a spec (its errors come back to the client as
400). Only JSON schemas get a light shape check here, on the event loop, so typos in a schema
fail at once with the path of the bad keyword; regexes and EBNF go to the compiler unchecked, since
any checker here would disagree with xgrammar's dialect.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from server.ipc import GrammarSpec

# Function and schema names: what OpenAI accepts.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class StructuredOutputError(ValueError):
    """A bad structured-output or tool request: becomes HTTP 400 with `message` and `param`."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message, self.param = message, param


def as_plain(obj: Any) -> Any:
    """Pydantic models (the protocol layer may use them) become plain dicts; the rest unchanged."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_none=True, by_alias=True)
    return obj


# ============================================================================ JSON schema shape check
#
# Why a hand-written check and not jsonschema's metaschema validation: measured with timeit on
# three realistic schemas (a 2-field tool's parameters, a nested object with a pattern, $defs +
# anyOf + array), this check takes 4-14 us per schema; `Draft202012Validator.check_schema` takes
# 1.0-2.1 ms, on the event loop. Caching jsonschema's verdict by schema text makes a repeat 0.6-1.1 us
# (+3-6 us for json.dumps), but every new schema (tool lists vary per client) still pays the
# milliseconds, jsonschema would become a runtime dependency (it is dev-only), and its verdict
# misses what matters here (e.g. minLength > maxLength is a valid schema).

_JSON_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("not", "additionalProperties", "items", "contains", "propertyNames", "if", "then", "else",
               "additionalItems", "unevaluatedProperties", "unevaluatedItems")
_NUMBERS = ("minimum", "maximum", "multipleOf")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_json_schema(schema: Any, path: str = "schema") -> None:
    """Raise StructuredOutputError for a structurally invalid JSON schema.

    A light check of keyword shapes (types, nesting, bounds) so typos fail fast with a clear
    message; what xgrammar cannot compile (a bad `pattern` included) is reported by the scheduler.
    """
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise StructuredOutputError(f"{path} must be a JSON object or boolean, got {type(schema).__name__}")
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        for name in types:
            if name not in _JSON_TYPES:
                raise StructuredOutputError(f"{path}.type: unknown type {name!r}; expected one of "
                                            f"{', '.join(sorted(_JSON_TYPES))}")
    for key in _SCHEMA_MAPS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, dict):
                raise StructuredOutputError(f"{path}.{key} must be an object")
            for name, s in sub.items():
                validate_json_schema(s, f"{path}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        if key in schema:
            sub = schema[key]
            if not isinstance(sub, list) or (key != "prefixItems" and not sub):
                raise StructuredOutputError(f"{path}.{key} must be a non-empty array of schemas")
            for i, s in enumerate(sub):
                validate_json_schema(s, f"{path}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        if key in schema:
            sub = schema[key]
            if key == "items" and isinstance(sub, list):  # draft-4 tuple form
                for i, s in enumerate(sub):
                    validate_json_schema(s, f"{path}.items[{i}]")
            else:
                validate_json_schema(sub, f"{path}.{key}")
    if "required" in schema:
        req = schema["required"]
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise StructuredOutputError(f"{path}.required must be an array of strings")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise StructuredOutputError(f"{path}.enum must be a non-empty array")
    for key in _NUMBERS:
        if key in schema and not _is_number(schema[key]):
            raise StructuredOutputError(f"{path}.{key} must be a number")
    if "multipleOf" in schema and schema["multipleOf"] <= 0:
        raise StructuredOutputError(f"{path}.multipleOf must be greater than 0")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not (_is_number(schema[key]) or isinstance(schema[key], bool)):
            raise StructuredOutputError(f"{path}.{key} must be a number")
    for key in _COUNTS:
        if key in schema:
            v = schema[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StructuredOutputError(f"{path}.{key} must be a non-negative integer")
    for lo, hi in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
                   ("minProperties", "maxProperties")):
        if lo in schema and hi in schema and schema[lo] > schema[hi]:
            raise StructuredOutputError(f"{path}: {lo} ({schema[lo]}) is greater than {hi} ({schema[hi]})")
    for key in ("pattern", "format", "$ref"):
        if key in schema and not isinstance(schema[key], str):
            raise StructuredOutputError(f"{path}.{key} must be a string")


# ============================================================================ response_format


def grammar_from_request(response_format: Any = None, regex: Optional[str] = None,
                         ebnf: Optional[str] = None) -> Optional[GrammarSpec]:
    """The GrammarSpec for a chat or completions request, or None when output is free text.

    response_format: OpenAI's object ({"type": "text" | "json_object" | "json_schema" |
    "structural_tag", ...}); regex / ebnf: SGLang's top-level extensions. At most one may
    constrain the output. Raises StructuredOutputError (HTTP 400).
    """
    specs: list[GrammarSpec] = []
    rf = as_plain(response_format)
    if rf is not None:
        if not isinstance(rf, dict):
            raise StructuredOutputError("response_format must be an object", "response_format")
        kind = rf.get("type")
        if kind == "text":
            pass
        elif kind == "json_object":
            specs.append(GrammarSpec("json_object"))
        elif kind == "json_schema":
            specs.append(_json_schema_spec(rf.get("json_schema")))
        elif kind == "structural_tag":
            if not isinstance(rf.get("format"), dict):
                raise StructuredOutputError("response_format.format must be an object for a structural_tag",
                                            "response_format.format")
            specs.append(GrammarSpec("structural_tag", json.dumps(rf)))
        else:
            raise StructuredOutputError(
                f"response_format.type must be 'text', 'json_object', 'json_schema' or 'structural_tag', "
                f"got {kind!r}", "response_format.type")
    for kind, text in (("regex", regex), ("ebnf", ebnf)):
        if text is None:
            continue
        # Only the shape: an empty regex would compile and force an empty answer.
        if not isinstance(text, str) or not text:
            raise StructuredOutputError(f"{kind} must be a non-empty string", kind)
        specs.append(GrammarSpec(kind, text))
    if len(specs) > 1:
        raise StructuredOutputError("only one of response_format (json), regex and ebnf may be given",
                                    "response_format")
    return specs[0] if specs else None


def _json_schema_spec(js: Any) -> GrammarSpec:
    js = as_plain(js)
    if not isinstance(js, dict):
        raise StructuredOutputError("response_format.json_schema must be an object with a 'schema'",
                                    "response_format.json_schema")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
        raise StructuredOutputError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                                    "response_format.json_schema.name")
    # SGLang and some clients send the schema under "schema_" (pydantic's alias clash) or "schema".
    schema = js.get("schema", js.get("schema_"))
    if schema is None:
        return GrammarSpec("json_object")
    if isinstance(schema, str):  # a schema sent as a JSON string
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(f"response_format.json_schema.schema is not valid JSON: {e}",
                                        "response_format.json_schema.schema") from e
    try:
        validate_json_schema(schema)
    except StructuredOutputError as e:
        raise StructuredOutputError(f"invalid JSON schema: {e.message}", "response_format.json_schema.schema") from e
    return GrammarSpec("json_schema", json.dumps(schema))


__all__ = ["NAME_PATTERN", "StructuredOutputError", "as_plain", "validate_json_schema", "grammar_from_request"]
