"""The OpenAPI 3 description of the REST API, served at ``/openapi.json``.

A test checks that every route the app registers appears here and vice versa.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.batch import MEDIA_TYPE as BATCH_MEDIA_TYPE

KEY_PATTERN = r"^[A-Za-z0-9._:@-]{1,512}$"

_ERR = {"$ref": "#/components/responses/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERR for code in codes}


_KEY_PARAM = {
    "name": "key",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": KEY_PATTERN},
}
_BLOCK_HEADERS = {
    "ETag": {"description": "quoted hex digest of the bytes", "schema": {"type": "string"}},
    "X-KV-Tier": {
        "description": "tier that served the block: hbm, dram, disk or another tier's name",
        "schema": {"type": "string"},
    },
}
_KEYS_BODY = {
    "required": True,
    "content": {"application/json": {"schema": _ref("Keys")}},
}
_LEASE_ID = {"name": "lease_id", "in": "path", "required": True, "schema": {"type": "string"}}


def build_spec(*, version: str = "0.1.0") -> dict[str, Any]:
    block_get = {
        "summary": "Read a block",
        "parameters": [
            _KEY_PARAM,
            {
                "name": "wait_ms",
                "in": "query",
                "required": False,
                "description": "wait up to N ms for an outstanding write lease to commit",
                "schema": {"type": "integer", "minimum": 0, "maximum": 60000},
            },
            {
                "name": "pin_ms",
                "in": "query",
                "required": False,
                "description": "pin the block against eviction for N ms (bounded by the server)",
                "schema": {"type": "integer", "minimum": 1, "maximum": 60000},
            },
            {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {
                "description": "the exact bytes",
                "headers": _BLOCK_HEADERS,
                "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            },
            "304": {"description": "If-None-Match matched", "headers": _BLOCK_HEADERS},
            **_errors(400, 401, 403, 404),
        },
    }
    paths: dict[str, Any] = {
        "/v1/blocks/{key}": {
            "put": {
                "summary": "Store the body as one block (first writer wins)",
                "parameters": [
                    _KEY_PARAM,
                    {"name": "X-KV-Dtype", "in": "header", "schema": {"type": "string"}},
                    {
                        "name": "X-KV-Shape",
                        "in": "header",
                        "description": "comma-separated non-negative integers",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "X-KV-TTL",
                        "in": "header",
                        "description": "seconds the block may be served",
                        "schema": {"type": "number", "minimum": 0.001, "maximum": 315360000},
                    },
                    {
                        "name": "X-KV-Lease-Token",
                        "in": "header",
                        "description": "the lease's fencing token (decimal) when writing under "
                        "a lease; a token older than the newest granted for the key is 409",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "201": {"description": "stored", "headers": {"ETag": _BLOCK_HEADERS["ETag"]}},
                    "200": {"description": "already present; the body was not stored again"},
                    **_errors(400, 401, 403, 409, 413, 415, 503, 507),
                },
            },
            "get": block_get,
            "head": {**block_get, "summary": "Whether a block exists (as GET, no body)"},
            "delete": {
                "summary": "Remove a block from every tier",
                "parameters": [_KEY_PARAM],
                "responses": {
                    "204": {"description": "deleted"},
                    **_errors(400, 401, 403, 404, 503),
                },
            },
        },
        "/v1/lookup": {
            "post": {
                "summary": "Longest present prefix of a key chain (optionally pinning it)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("LookupRequest")}},
                },
                "responses": {
                    "200": _json(_ref("LookupResult"), "prefix hits and their tiers"),
                    **_errors(400, 401, 403, 413),
                },
            }
        },
        "/v1/prefetch": {
            "post": {
                "summary": "Hint that blocks will be read soon (promoted in the background)",
                "requestBody": _KEYS_BODY,
                "responses": {
                    "202": _json(_ref("Accepted"), "scheduled"),
                    **_errors(400, 401, 403, 413),
                },
            }
        },
        "/v1/batch/get": {
            "post": {
                "summary": "Read many blocks in one round trip",
                "description": "Answers an application/x-kvgate-batch frame (see docs/api.md): "
                "one item per requested key, in order, status 200 with tier and bytes or 404.",
                "requestBody": _KEYS_BODY,
                "responses": {
                    "200": {
                        "description": "batch frame",
                        "content": {BATCH_MEDIA_TYPE: {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 403, 413),
                },
            }
        },
        "/v1/batch/put": {
            "post": {
                "summary": "Store many blocks in one round trip",
                "description": "Takes an application/x-kvgate-batch frame (status 0, no tier); "
                "X-KV-Dtype / X-KV-TTL headers apply to every item.",
                "requestBody": {
                    "required": True,
                    "content": {BATCH_MEDIA_TYPE: {"schema": {"type": "string"}}},
                },
                "responses": {
                    "200": _json(_ref("BatchPutResult"), "per-item outcome"),
                    **_errors(400, 401, 403, 413, 415),
                },
            }
        },
        "/v1/leases": {
            "post": {
                "summary": "Ask to be the one writer of a key",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("LeaseRequest")}},
                },
                "responses": {
                    "201": _json(_ref("Lease"), "granted"),
                    "200": _json(_ref("Exists"), "the block is already stored"),
                    "409": _json(_ref("LeaseHeld"), "another writer holds the lease"),
                    **_errors(400, 401, 403),
                },
            }
        },
        "/v1/leases/{lease_id}/renew": {
            "post": {
                "summary": "Extend a lease (same token)",
                "parameters": [_LEASE_ID],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": _ref("Renew")}},
                },
                "responses": {
                    "200": _json(_ref("Renewed"), "renewed"),
                    **_errors(400, 401, 403, 404, 409),
                },
            }
        },
        "/v1/leases/{lease_id}": {
            "delete": {
                "summary": "Release a lease without writing",
                "parameters": [_LEASE_ID],
                "responses": {
                    "204": {"description": "released (or nothing to release)"},
                    **_errors(400, 401, 403),
                },
            }
        },
        "/v1/stats": {
            "get": {
                "summary": "Per-tier statistics, hottest tier first",
                "description": "With tenants configured, every number is the caller's own "
                "share (its bytes, blocks, reads, evictions, pins and leases); capacities are "
                "the tiers' own. Totals are on /metrics.",
                "responses": {"200": _json(_ref("Stats"), "stats"), **_errors(401, 403)},
            }
        },
        "/v1/metrics/summary": {
            "get": {
                "summary": "Latency percentiles per tier, hits, misses and the hit ratio (JSON)",
                "description": "What the dashboard polls: per-tier levels (as /v1/stats), "
                "hits and misses as the hierarchy sees them, get/put latency percentiles "
                "(ms, since start) and the overall read hit ratio. With tenants configured "
                "a tenant reads only its own figures (as on /v1/stats: its blocks, reads, "
                "moves, the latency of its own reads and writes, its leases); the metrics "
                "token reads the totals.",
                "responses": {
                    "200": _json(_ref("MetricsSummary"), "summary"),
                    **_errors(401, 403),
                },
            }
        },
        "/dashboard": {
            "get": {
                "summary": "Live dashboard (one self-contained HTML page)",
                "description": "Polls /v1/stats and /v1/metrics/summary. With tenants "
                "configured, open it as /dashboard#token=TOKEN (a tenant's token: its own "
                "figures; the metrics token: the totals).",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (per-tier series carry a tier label)",
                "description": "Open unless metrics_token_sha256 is configured; then the "
                "scraper's bearer token is required (401 without it, 403 with another).",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(401, 403),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json({"type": "object"}, "alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness (the tiers are open)",
                "responses": {"200": _json({"type": "object"}, "ready"), **_errors(503)},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")},
            }
        },
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "detail"],
            "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
        },
        "Keys": {
            "type": "object",
            "required": ["keys"],
            "properties": {
                "keys": {"type": "array", "items": {"type": "string", "pattern": KEY_PATTERN}}
            },
        },
        "LookupRequest": {
            "type": "object",
            "required": ["keys"],
            "properties": {
                "keys": {"type": "array", "items": {"type": "string", "pattern": KEY_PATTERN}},
                "pin_ms": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 60000,
                    "description": "pin the present prefix against eviction for this long",
                },
            },
        },
        "LookupResult": {
            "type": "object",
            "required": ["prefix_hits", "tiers"],
            "properties": {
                "prefix_hits": {"type": "integer", "minimum": 0},
                "tiers": {"type": "array", "items": {"type": "string"}},
                "pinned": {"type": "integer", "description": "blocks pinned (with pin_ms)"},
            },
        },
        "Accepted": {"type": "object", "properties": {"accepted": {"type": "integer"}}},
        "BatchPutResult": {
            "type": "object",
            "properties": {
                "stored": {"type": "integer"},
                "exists": {"type": "integer"},
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "key": {"type": "string"},
                            "status": {"type": "integer"},
                            "error": {"type": "string"},
                        },
                    },
                },
            },
        },
        "LeaseRequest": {
            "type": "object",
            "required": ["key", "ttl_ms"],
            "properties": {
                "key": {"type": "string", "pattern": KEY_PATTERN},
                "ttl_ms": {"type": "integer", "minimum": 1},
            },
        },
        "Lease": {
            "type": "object",
            "required": ["lease_id", "token", "expires_at_ms"],
            "properties": {
                "lease_id": {"type": "string"},
                "token": {"type": "integer", "description": "fencing token: X-KV-Lease-Token"},
                "expires_at_ms": {"type": "integer", "description": "wall clock, ms"},
            },
        },
        "LeaseHeld": {
            "type": "object",
            "required": ["error", "detail", "retry_after_ms"],
            "properties": {
                "error": {"type": "string"},
                "detail": {"type": "string"},
                "retry_after_ms": {"type": "integer"},
            },
        },
        "Renew": {"type": "object", "properties": {"ttl_ms": {"type": "integer", "minimum": 1}}},
        "Renewed": {
            "type": "object",
            "required": ["expires_at_ms"],
            "properties": {"expires_at_ms": {"type": "integer"}},
        },
        "Exists": {"type": "object", "properties": {"exists": {"type": "boolean"}}},
        "TierStats": {
            "type": "object",
            "required": [
                "name",
                "device",
                "capacity_bytes",
                "used_bytes",
                "blocks",
                "hits",
                "misses",
                "evictions",
            ],
            "properties": {
                "name": {"type": "string"},
                "device": {"type": "string"},
                "capacity_bytes": {"type": "integer"},
                "used_bytes": {"type": "integer"},
                "blocks": {"type": "integer"},
                "hits": {"type": "integer"},
                "misses": {"type": "integer"},
                "evictions": {"type": "integer"},
            },
        },
        "Stats": {
            "type": "object",
            "required": ["tiers"],
            "properties": {
                "tiers": {"type": "array", "items": _ref("TierStats")},
                "pinned_bytes": {"type": "integer"},
                "pinned_blocks": {"type": "integer"},
                "leases": {
                    "type": "object",
                    "properties": {
                        "live": {"type": "integer"},
                        "waiters": {"type": "integer"},
                        "remembered": {"type": "integer"},
                    },
                },
                "tenant": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "used_bytes": {"type": "integer"},
                        "quota_bytes": {"type": "integer", "nullable": True},
                    },
                },
            },
        },
        "Latency": {
            "type": "object",
            "properties": {
                name: {"type": "number", "nullable": True}
                for name in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")
            }
            | {"count": {"type": "integer"}},
        },
        "TierSummary": {
            "allOf": [
                _ref("TierStats"),
                {
                    "type": "object",
                    "properties": {
                        "hit_ratio": {"type": "number", "nullable": True},
                        "promotions": {"type": "integer"},
                        "demotions": {"type": "integer"},
                        "get": _ref("Latency"),
                        "put": _ref("Latency"),
                    },
                },
            ]
        },
        "MetricsSummary": {
            "type": "object",
            "required": ["tiers", "reads"],
            "properties": {
                "uptime_s": {"type": "number"},
                "tiers": {"type": "array", "items": _ref("TierSummary")},
                "reads": {
                    "type": "object",
                    "properties": {
                        "total": {"type": "integer"},
                        "hits": {"type": "integer"},
                        "misses": {"type": "integer"},
                        "hit_ratio": {"type": "number", "nullable": True},
                        "by_tier": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                        },
                    },
                },
                "leases": {
                    "type": "object",
                    "nullable": True,
                    "properties": {
                        "live": {"type": "integer"},
                        "waiters": {"type": "integer"},
                    },
                },
            },
        },
    }
    paths.update(_shm_paths())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "kvgate",
            "version": version,
            "description": "KV-cache gateway for LLM serving. Every error answer is JSON "
            '{"error": ..., "detail": ...}.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {"Error": _json(_ref("Error"), "error")},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _shm_op(summary: str, description: str, ok: str, *codes: int) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "description": description,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "responses": {ok: _json({"type": "object"}, "JSON answer"), **_errors(*codes)},
        }
    }


def _shm_paths() -> dict[str, Any]:
    """The same-host shared-memory data plane (docs/perf.md): JSON control, bytes in /dev/shm."""
    return {
        "/v1/shm/attach": _shm_op(
            "Open a shared-memory session",
            "Answers {session, segments: [{name, path, size, writable, kind, ticket?}], "
            "lease_ms}. Shared sessions: the arena segments to map read-only and this "
            "session's writable staging file. Private sessions (shm_isolation; the default "
            "with tenants): only the staging segment, kind fd: connect to the Unix socket at "
            "path, write the single-use ticket and a newline, receive its descriptor "
            "(SCM_RIGHTS). 503: no shared memory, or the tenant's sessions are at their cap.",
            "201",
            401,
            403,
            503,
        ),
        "/v1/shm/detach": _shm_op(
            "Close a session", '{"session"}: ends its leases, unlinks its staging.', "204", 404
        ),
        "/v1/shm/get": _shm_op(
            "Where blocks lie in shared memory",
            '{"session", "keys", "ttl_ms"?, "release"?: [lease ids]} -> {"lease", "items": '
            '[{"key", "status" (200, 404, or 307 = read it over HTTP), "tier", "size", "etag", '
            '"segment", "runs": [[offset, length], ...]}]}; the bytes stay pinned until the '
            "lease is released or expires.",
            "200",
            400,
            401,
            403,
            404,
            413,
        ),
        "/v1/shm/release": _shm_op(
            "Release read leases", '{"session", "leases": [...]} -> {"released": n}', "200", 404
        ),
        "/v1/shm/reserve": _shm_op(
            "Reserve staging space for PUTs",
            '{"session", "sizes": [n, ...]} -> {"lease", "regions": [{"segment", "runs"}]}',
            "201",
            400,
            404,
            413,
        ),
        "/v1/shm/commit": _shm_op(
            "Store what was written into reserved staging space",
            '{"session", "lease", "keys": [...], "dtype"?, "ttl_s"?} -> {"results": '
            '[{"key", "status", "error"?}]} with the statuses of PUT (201, 200, 409 when '
            "another writer holds the key's lease, 413, 507).",
            "200",
            400,
            404,
        ),
    }


def spec_bytes() -> bytes:
    return json.dumps(build_spec(), separators=(",", ":")).encode()
