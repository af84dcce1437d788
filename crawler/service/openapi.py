"""The API's OpenAPI 3.1 description, served at /v1/openapi.json (a test keeps it true)."""

from __future__ import annotations

from typing import Any

from crawler.service.jobs import JOB_OPTIONS

_ERROR = {"$ref": "#/components/schemas/Error"}
_JOB = {"$ref": "#/components/schemas/Job"}


def _answer(
    description: str, schema: dict[str, Any] | None = None, media: str = "application/json"
) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description}
    if schema is not None:
        body["content"] = {media: {"schema": schema}}
    return body


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _answer("error", _ERROR) for s in statuses}


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_SHA = {
    "name": "sha256",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "crawler", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Options": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {name: {} for name in JOB_OPTIONS},
                },
                "Job": {
                    "type": "object",
                    "required": ["id", "state", "urls", "created", "links"],
                    "properties": {
                        "id": {"type": "string"},
                        "state": {"enum": ["queued", "running", "done", "cancelled", "failed"]},
                        "urls": {"type": "integer"},
                        "options": {"$ref": "#/components/schemas/Options"},
                        "created": {"type": "number"},
                        "started": {"type": ["number", "null"]},
                        "finished": {"type": ["number", "null"]},
                        "error": {"type": ["string", "null"]},
                        "done": {"type": "integer"},
                        "by_status": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                        "by_error": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "rate": {"type": "number", "description": "URLs per second"},
                        "links": {"type": "object"},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit a crawl job",
                    "parameters": [
                        {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "text/plain": {
                                "schema": {"type": "string", "description": "one URL a line"}
                            },
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["urls"],
                                    "properties": {
                                        "urls": {"type": "array", "items": {"type": "string"}},
                                        "options": {"$ref": "#/components/schemas/Options"},
                                    },
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": _answer("accepted", _JOB),
                        "200": _answer(
                            "the job an earlier submission with this Idempotency-Key made", _JOB
                        ),
                        **_errors(400, 401, 413, 415, 429, 503, 507),
                    },
                },
                "get": {
                    "summary": "List jobs, newest first",
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "maximum": 500},
                        },
                        {"name": "before", "in": "query", "schema": {"type": "number"}},
                    ],
                    "responses": {"200": _answer("a page of jobs"), **_errors(400, 401)},
                },
            },
            "/v1/jobs/{id}": {
                "parameters": [_ID],
                "get": {
                    "summary": "A job, with counts",
                    "responses": {"200": _answer("the job", _JOB), **_errors(401, 404)},
                },
                "delete": {
                    "summary": "Cancel a job",
                    "responses": {"200": _answer("the job", _JOB), **_errors(401, 404)},
                },
            },
            "/v1/jobs/{id}/records": {
                "parameters": [_ID],
                "get": {
                    "summary": "The job's manifest, streamed as JSON Lines",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"enum": ["ok", "failed", "skipped"]},
                        }
                    ],
                    "responses": {
                        "200": _answer("records", {"type": "string"}, "application/x-ndjson"),
                        **_errors(400, 401, 404),
                    },
                },
            },
            "/v1/images/{sha256}": {
                "parameters": [_SHA],
                "get": {
                    "summary": "A stored original",
                    "responses": {
                        "200": _answer("the image"),
                        "304": _answer("not modified"),
                        **_errors(400, 401, 404),
                    },
                },
            },
            "/v1/images/{sha256}/thumbnail": {
                "parameters": [
                    _SHA,
                    {"name": "size", "in": "query", "schema": {"type": "integer"}},
                ],
                "get": {
                    "summary": "A thumbnail",
                    "responses": {
                        "200": _answer("the thumbnail"),
                        "304": _answer("not modified"),
                        **_errors(400, 401, 404),
                    },
                },
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": _answer("OpenAPI")}}
            },
            "/healthz": {
                "get": {
                    "summary": "Process alive",
                    "security": [],
                    "responses": {"200": _answer("alive")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Accepting jobs",
                    "security": [],
                    "responses": {"200": _answer("ready"), **_errors(503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": _answer("metrics", {"type": "string"}, "text/plain")},
                }
            },
        },
    }
