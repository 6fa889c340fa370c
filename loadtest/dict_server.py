"""The ceiling reference: a bare aiohttp server that keeps blocks in a dict.

It speaks the subset of kvgate's REST API the scenarios use (PUT/GET/HEAD/DELETE a block,
POST /v1/lookup), so the same HTTP client drives both and the ratio kvgate/dict isolates what
kvgate adds on top of aiohttp itself. Memory is bounded LRU-style by ``--max-bytes`` (like
the redis peer's allkeys-lru).

    python -m loadtest.dict_server --port 8099 [--max-bytes 1GiB]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

from aiohttp import web

from loadtest.sizes import parse_size

STORE = web.AppKey("store", OrderedDict[str, bytes])
LIMIT = web.AppKey("limit", int)
USED = web.AppKey("used", list[int])


async def get_block(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    key = request.match_info["key"]
    value = store.get(key)
    if value is None:
        raise web.HTTPNotFound()
    store.move_to_end(key)
    if request.method == "HEAD":
        return web.Response(headers={"Content-Length": str(len(value)), "X-KV-Tier": "dict"})
    return web.Response(body=value, headers={"X-KV-Tier": "dict"})


async def put_block(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    body = await request.read()
    store, used = request.app[STORE], request.app[USED]
    if key in store:
        return web.Response(status=200)
    store[key] = body
    used[0] += len(body)
    while used[0] > request.app[LIMIT] and store:
        _, old = store.popitem(last=False)
        used[0] -= len(old)
    return web.Response(status=201)


async def delete_block(request: web.Request) -> web.Response:
    value = request.app[STORE].pop(request.match_info["key"], None)
    if value is None:
        raise web.HTTPNotFound()
    request.app[USED][0] -= len(value)
    return web.Response(status=204)


async def lookup(request: web.Request) -> web.Response:
    keys = (await request.json())["keys"]
    store = request.app[STORE]
    hits = 0
    for key in keys:
        if key not in store:
            break
        hits += 1
    return web.Response(
        text=json.dumps({"prefix_hits": hits, "tiers": ["dict"] * hits}),
        content_type="application/json",
    )


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(*, max_bytes: int) -> web.Application:
    # Blocks up to 64 MiB; anything larger is a harness bug, not a benchmark.
    app = web.Application(client_max_size=64 << 20)
    app[STORE] = OrderedDict()
    app[LIMIT] = max_bytes
    app[USED] = [0]
    app.router.add_get("/v1/blocks/{key}", get_block)  # also answers HEAD
    app.router.add_put("/v1/blocks/{key}", put_block)
    app.router.add_delete("/v1/blocks/{key}", delete_block)
    app.router.add_post("/v1/lookup", lookup)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.dict_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--max-bytes", type=parse_size, default=parse_size("1GiB"))
    args = parser.parse_args(argv)
    web.run_app(make_app(max_bytes=args.max_bytes), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
