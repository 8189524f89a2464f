"""The coordinator's public port: TLS in front of the loopback SuperLink, forwarding Flower's Fleet API and nothing else.

Flower 1.42 serves Fleet (SuperNodes), Control (`flwr ls/run/stop`, node registration) and Runtime (SuperExec) on
one HTTP port, and its open-source Control API authenticates nobody. So the SuperLink listens on 127.0.0.1 only,
and this gateway (Starlette on uvicorn, both already Flower dependencies; httpx as the upstream client) is all
the network can reach: `POST /v1/fleet/<method>`, forwarded byte for byte with the node's signed headers.
Every other path answers 404 without reaching the SuperLink.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

# Flower's Fleet router: prefix /v1/fleet, one POST per method (register-node, pull-messages, ...).
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]{0,63}")
# Hop-by-hop and routing headers are the gateway's own business; everything else (node signature,
# timestamp, Flower version, content type) passes through untouched.
_DROP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "content-length"})
MAX_BODY = 512 * 1024 * 1024  # a whole model's arrays travel as objects; refuse anything beyond reason
# The SuperLink keeps its state in SQLite. Twenty SuperNodes pushing replies at once made it answer "database is
# locked" (HTTP 500), and a SuperNode does not resend a reply it failed to push: the round then waited for its
# deadline (measured, 20 clients on 2 cores). One Fleet call at a time reaches the SuperLink; each is
# milliseconds on loopback, model objects included (a LoRA update is ~0.3 MB).
MAX_IN_FLIGHT = 1


def build_app(upstream: str, ca: Path | None) -> Starlette:
    """A Starlette app that forwards Fleet API calls to `upstream` (the SuperLink on loopback)."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca is not None else False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=httpx.Timeout(300.0, connect=10.0))
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not FLEET_PATH.fullmatch(path) or request.url.query:
            return PlainTextResponse("not found", status_code=404)
        body = await request.body()
        if len(body) > MAX_BODY:
            return PlainTextResponse("request too large", status_code=413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        try:
            async with in_flight:
                reply = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError:
            return PlainTextResponse("the coordinator is not ready", status_code=503)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP | {"content-encoding", "server", "date"}}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    routes = [Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])]

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedtune.coordinator.fleet_gateway", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True, help="address to listen on (the coordinator's public address)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the SuperLink on loopback, e.g. https://127.0.0.1:PORT")
    p.add_argument("--ca", type=Path, help="CA that signed the SuperLink's certificate (omit with --insecure)")
    p.add_argument("--certfile", type=Path, help="this port's certificate (the coordinator's server.pem)")
    p.add_argument("--keyfile", type=Path, help="its private key")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (testing only)")
    args = p.parse_args(argv)
    tls = {} if args.insecure else {"ssl_certfile": str(args.certfile), "ssl_keyfile": str(args.keyfile)}
    app = build_app(args.upstream, None if args.insecure else args.ca)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, server_header=False, **tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
