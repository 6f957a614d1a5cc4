"""Requests -> GrammarSpec on the API side (server/grammar_spec.py): pure Python, no model.

Regexes and EBNF are not checked here but by the scheduler's xgrammar compile; that they come back
as 400s is tested end to end in tests/test_structured_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.grammar_spec import StructuredOutputError, grammar_from_request, validate_json_schema
from server.ipc import GrammarSpec


def test_api_side_modules_import_no_heavy_modules():
    code = ("import sys, server.grammar_spec, server.tool_plan, server.tool_parser, server.structured_chat; "
            "bad = [m for m in ('torch', 'xgrammar', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- response_format


def test_response_format_kinds():
    assert grammar_from_request(None) is None
    assert grammar_from_request({"type": "text"}) is None
    assert grammar_from_request({"type": "json_object"}) == GrammarSpec("json_object")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = grammar_from_request({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                       "strict": True}})
    assert spec.kind == "json_schema" and json.loads(spec.spec) == schema
    # A schema sent as a JSON string, and a json_schema without a schema (any object).
    assert json.loads(grammar_from_request({"type": "json_schema", "json_schema": {
        "name": "x", "schema": json.dumps(schema)}}).spec) == schema
    assert grammar_from_request({"type": "json_schema", "json_schema": {"name": "x"}}) == GrammarSpec("json_object")
    assert grammar_from_request(regex=r"\d+") == GrammarSpec("regex", r"\d+")
    assert grammar_from_request(ebnf='root ::= "a"') == GrammarSpec("ebnf", 'root ::= "a"')
    tag = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}
    assert json.loads(grammar_from_request(tag).spec) == tag


def test_response_format_accepts_pydantic_like_objects():
    class Model:
        def model_dump(self, **_):
            return {"type": "json_object"}

    assert grammar_from_request(Model()) == GrammarSpec("json_object")


@pytest.mark.parametrize("kwargs,param", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "{oops"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strng"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "regex": "a+"}, "response_format"),
    ({"regex": ""}, "regex"),  # would compile, and force an empty answer
    ({"ebnf": ""}, "ebnf"),
    ({"regex": 3}, "regex"),
])
def test_bad_requests_are_400_errors(kwargs, param):
    with pytest.raises(StructuredOutputError) as e:
        grammar_from_request(**kwargs)
    assert e.value.param == param and e.value.message


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}}},
    {"type": ["string", "null"], "maxLength": 3},
    {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/x"}], "$defs": {"x": {"type": "integer"}}},
    {"type": "array", "items": {"enum": [1, "a", None]}, "minItems": 0, "maxItems": 2},
    True,
    {},
])
def test_valid_schemas_become_json_schema_specs(schema):
    validate_json_schema(schema)  # no error
    spec = grammar_from_request({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert spec.kind == "json_schema" and json.loads(spec.spec) == schema


@pytest.mark.parametrize("schema,needle", [
    ({"type": "strng"}, "unknown type"),
    ({"properties": []}, "properties must be an object"),
    ({"properties": {"a": {"type": "int"}}}, "schema.properties.a.type"),
    ({"required": "a"}, "required"),
    ({"enum": []}, "enum"),
    ({"minimum": "0"}, "minimum"),
    ({"minItems": -1}, "minItems"),
    ({"minLength": 5, "maxLength": 2}, "greater than"),
    ({"items": {"anyOf": []}}, "anyOf"),
    ({"pattern": 3}, "pattern must be a string"),  # its syntax is xgrammar's to judge
    ([1], "JSON object or boolean"),
])
def test_invalid_schemas_are_rejected(schema, needle):
    with pytest.raises(StructuredOutputError, match=needle):
        validate_json_schema(schema)


@pytest.mark.parametrize("pattern", [r"\d{3}-\w+", "(a", "(?<=a)b", "a{2,1}", r"\p{L}+", " "])
def test_regex_and_ebnf_go_to_the_compiler_unchecked(pattern):
    # xgrammar's dialect is the judge (the scheduler answers 400): no second opinion here.
    assert grammar_from_request(regex=pattern) == GrammarSpec("regex", pattern)
    assert grammar_from_request(ebnf="start ::= 'x'") == GrammarSpec("ebnf", "start ::= 'x'")
    schema = {"type": "string", "pattern": pattern}
    spec = grammar_from_request({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert json.loads(spec.spec) == schema
