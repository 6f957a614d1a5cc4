"""OpenAPI documentation for the routes that decode their raw bodies with msgspec.

The generation routes read `await request.body()` and decode it into a msgspec Struct
(server/protocol.py), so FastAPI sees no body model and would document no request body. Here the
body schemas come from the Structs themselves (`msgspec.json.schema_components`), so the document
cannot drift from what the server decodes: field types, required fields, forbidden extra fields and
any `msgspec.Meta` constraints all appear as they are enforced.

`json_operation(Struct)` is a route's `openapi_extra`; `install(app)` then gathers the definitions
those operations refer to into the document's single `components/schemas` section.
"""

from __future__ import annotations

from typing import Any, Optional

import msgspec
from fastapi import FastAPI

_REF_TEMPLATE = "#/components/schemas/{name}"
_DEFS_KEY = "x-skiff-schemas"  # where an operation carries its definitions until install() hoists them


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object (server.protocol.error_body builds it)."""

    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(msgspec.Struct):
    """The body of every 4xx/5xx answer."""

    error: ErrorDetail


_ERROR_STATUSES = {
    "400": "Invalid request (malformed JSON, a schema violation, a value out of range, an unsupported field)",
    "401": "Missing or wrong API key (only when the server runs with --api-key)",
    "404": "Unknown model",
    "503": "Overloaded or shutting down (with Retry-After)",
}


def json_operation(body: type[msgspec.Struct], streams: bool = False) -> dict[str, Any]:
    """The `openapi_extra` of a POST route that decodes a JSON body into `body`: its required
    request body, a 200 (JSON, or Server-Sent Events when `streams` and the body asks to stream)
    and the OpenAI-shaped errors. Call `install` on the app to make the document complete."""
    (body_ref, error_ref), defs = msgspec.json.schema_components([body, ErrorResponse], ref_template=_REF_TEMPLATE)
    ok = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        # no schema: a schema here would describe each event, and the events are the route's chunks
        ok["text/event-stream"] = {}
    error = {"application/json": {"schema": error_ref}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body_ref}}},
        "responses": {"200": {"description": "Success" + (" (a stream of events when `stream` is true)"
                                                          if streams else ""), "content": ok},
                      **{status: {"description": text, "content": error} for status, text in _ERROR_STATUSES.items()}},
        _DEFS_KEY: defs,
    }


def _hoist(doc: dict[str, Any], routes) -> dict[str, Any]:
    """Put the definitions the `routes`' json_operations carry into components/schemas and drop
    the carrier key from the operations (idempotent). The definitions are taken from the routes,
    not from the generated document: FastAPI's serialization drops `"default": null`."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for route in routes:
        for name, schema in (getattr(route, "openapi_extra", None) or {}).get(_DEFS_KEY, {}).items():
            if schemas.setdefault(name, schema) != schema:
                raise ValueError(f"two different OpenAPI schemas are named {name!r}")
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            operation.pop(_DEFS_KEY, None)
    return doc


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) include the definitions of its `json_operation`s."""
    generate = app.openapi  # FastAPI's own: builds the document once and caches it on the app

    def openapi() -> dict[str, Any]:
        return _hoist(generate(), app.routes)

    app.openapi = openapi  # type: ignore[method-assign]
