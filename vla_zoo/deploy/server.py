"""Serve one policy over websockets so a robot controller or simulator in another process (or machine) can use it.

Protocol: every message is a binary websocket frame holding one msgpack map (see ``codec``), one reply per
request, in order. Requests::

    {"type": "get_action", "observation": {...}}   -> {"result": {"actions": float32 [H, A]}}
    {"type": "metadata"}                           -> {"result": policy.metadata()}
    {"type": "reset"}                              -> {"result": None}
    {"type": "ping"}                               -> {"result": "pong"}

Any bad request gets ``{"error": {"type": ..., "message": ...}}`` and the connection stays open; error types are
``DecodeError`` (not msgpack, malformed array), ``BadRequest`` (not a map, unknown type, no observation),
``InvalidObservation`` (does not match ``metadata()``: the message names the key and what was expected) and
``PolicyError`` (the policy itself raised); during shutdown, ``ShuttingDown``.

Command::

    python -m vla_zoo.deploy.server --checkpoint runs/x/checkpoints/last.ckpt --host 0.0.0.0 --port 8000
    python -m vla_zoo.deploy.server --replay data/robot          # replay recorded actions, no model
    python -m vla_zoo.deploy.server --policy my_pkg.policies:make_policy --policy-kwargs '{"seed": 0}'

It prints ``{"event": "listening", "host": ..., "port": ...}`` as one JSON line on stdout once it accepts
connections (so ``--port 0`` works for scripts and tests). On SIGTERM or SIGINT it stops accepting requests, answers
the one in flight, closes every connection and exits with status 0.

Access: with a shared secret (``--token`` or the ``VLA_ZOO_TOKEN`` environment variable; required to bind anything
but loopback) a client must send ``Authorization: Bearer <token>`` in the websocket handshake (``RemotePolicy`` does)
or gets HTTP 401. Browsers send an ``Origin`` header and are refused (HTTP 403) unless ``--allow-origin`` names it,
so a web page cannot drive the robot through a visitor's browser. The token travels in clear text over ``ws://``:
beyond a trusted network, reach the server through an SSH tunnel or a TLS proxy.

Availability: requests are decoded under limits derived from ``metadata()`` (``validation.request_limits``), large
ones on a decoder thread, and the policy runs on its own thread, so one client's message cannot stall or exhaust the
server for the others.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import http
import ipaddress
import json
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vla_zoo.deploy.codec import CodecError, packb, unpackb
from vla_zoo.deploy.validation import ObservationError, check_metadata, request_limits, validate_observation

log = logging.getLogger("vla_zoo.deploy.server")

REQUEST_TYPES = ("get_action", "metadata", "reset", "ping")
#: Largest reply a client accepts by default: a few full-resolution camera views fit; a runaway server does not.
MAX_MESSAGE_BYTES = 64 * 2**20
#: Environment variable holding the shared secret, read by the server and by ``RemotePolicy``.
TOKEN_ENV = "VLA_ZOO_TOKEN"
#: Messages up to this size are decoded on the event loop: bounded microseconds, and no thread hop for pings.
INLINE_DECODE_BYTES = 64 * 2**10


class BadRequest(ValueError):
    """A well-formed msgpack message that is not a valid request."""


def error_response(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches this machine only (an unknown name counts as reachable from outside)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PolicyServer:
    """Serves ``policy`` (anything following the policy contract) to any number of websocket clients.

    Policy calls run one at a time on a single worker thread: policies hold state (action queues, cached System 2
    tokens, CUDA streams) and are not thread-safe, and one worker serialises them without a separate lock. Messages
    over ``INLINE_DECODE_BYTES`` are decoded and validated on a separate decoder thread, all under
    ``request_limits(metadata)``, so the event loop keeps answering pings and bad requests from other clients while
    one client's large message is decoded or the policy is busy.
    Note that several clients share this one policy and so its ``reset()``; serve one policy per robot when the
    policy keeps per-episode state.

    ``token``: the shared secret every client must present (required unless ``host`` is loopback).
    ``allow_origins``: browser ``Origin`` values to accept; any other origin is refused.
    ``max_message_bytes``: overrides the message size derived from the metadata.
    """

    def __init__(
        self,
        policy: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int | None = None,
        drain_timeout: float = 10.0,
        token: str | None = None,
        allow_origins: Sequence[str] = (),
    ) -> None:
        if token == "":
            raise ValueError("the token is empty; pass a secret, e.g. from "
                             "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
        if token is None and not is_loopback(host):
            raise ValueError(
                f"binding {host!r} lets other machines drive this policy: set a shared secret with --token or the "
                f"{TOKEN_ENV} environment variable (clients pass the same to RemotePolicy), or bind 127.0.0.1"
            )
        self.policy = policy
        self.host = host
        self.port = port
        self.drain_timeout = drain_timeout
        self._token = token
        self.allow_origins = list(allow_origins)
        self._metadata = policy.metadata()
        check_metadata(self._metadata)
        self.limits = request_limits(self._metadata, max_message_bytes)
        self.max_message_bytes = self.limits.max_message_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self._stopping = False
        self._in_flight = 0  # requests received and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()

    async def _call_policy(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_token(self, connection: ServerConnection, request: Request) -> Response | None:
        """``process_request`` hook: None lets the handshake go on; a 401 response refuses it."""
        values = request.headers.get_all("Authorization")
        scheme, _, presented = (values[0] if len(values) == 1 else "").partition(" ")
        # compare_digest's time does not depend on where the tokens differ: no timing hint of the right one.
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), self._token.encode()):
            return None
        log.warning("refused %s: missing or wrong token", connection.remote_address)
        return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"missing or wrong token: send 'Authorization: Bearer "
                                  f"<token>' (RemotePolicy(token=...) or the {TOKEN_ENV} environment variable)\n")

    def parse(self, message: bytes) -> dict[str, Any]:
        """Decode and check one request; raises ``CodecError``, ``BadRequest`` or ``ObservationError``."""
        request = unpackb(message, self.limits)
        if not isinstance(request, dict):
            raise BadRequest(f"a request must be a map with a 'type' key, got {type(request).__name__}")
        kind = request.get("type")
        if kind not in REQUEST_TYPES:
            raise BadRequest(f"unknown request type {kind!r}; expected one of {list(REQUEST_TYPES)}")
        if kind == "get_action":
            if "observation" not in request:
                raise BadRequest("a get_action request needs an 'observation' map")
            validate_observation(request["observation"], self._metadata)
        return request

    async def _result(self, request: dict[str, Any]) -> Any:
        kind = request["type"]
        if kind == "get_action":
            return await self._call_policy(self.policy.get_action, request["observation"])
        if kind == "metadata":
            return self._metadata
        if kind == "reset":
            reset = getattr(self.policy, "reset", None)
            if reset is not None:
                await self._call_policy(reset)
            return None
        return "pong"

    async def respond(self, message: str | bytes) -> bytes:
        """The encoded reply to one raw websocket message; never raises."""
        try:
            if isinstance(message, str):
                raise CodecError("got a text frame; send msgpack as a binary frame")
            if len(message) <= INLINE_DECODE_BYTES:
                request = self.parse(message)
            else:
                request = await asyncio.get_running_loop().run_in_executor(self._decoder, self.parse, message)
            return packb({"result": await self._result(request)})
        except CodecError as e:
            return packb(error_response("DecodeError", str(e)))
        except BadRequest as e:
            return packb(error_response("BadRequest", str(e)))
        except ObservationError as e:
            return packb(error_response("InvalidObservation", str(e)))
        except Exception as e:  # the policy (or encoding its reply) failed: report it, keep serving
            log.exception("policy call failed")
            return packb(error_response("PolicyError", f"{type(e).__name__}: {e}"))

    async def _handle(self, connection: ServerConnection) -> None:
        try:
            async for message in connection:
                if self._stopping:
                    await connection.send(packb(error_response("ShuttingDown", "the policy server is shutting down")))
                    continue
                self._in_flight += 1
                self._idle.clear()
                try:
                    await connection.send(await self.respond(message))
                finally:
                    self._in_flight -= 1
                    if not self._in_flight:
                        self._idle.set()
        except ConnectionClosed:
            pass  # a client that vanished mid-request is that client's problem, not the server's

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[str, int], None] | None = None) -> bool:
        """Serve until ``stop`` is set; then answer the requests in flight (up to ``drain_timeout`` s) and close.

        Returns False if a policy call was still running when the drain timed out.
        """
        # No permessage-deflate: two 224x224 camera views shrink by under 15% yet take 15-25 ms to deflate here,
        # 20-40x the whole uncompressed loopback round trip (benchmarks/serving.py).
        async with serve(
            self._handle, self.host, self.port, max_size=self.max_message_bytes, compression=None, close_timeout=1,
            # None: clients that send no Origin header (every non-browser client); browsers always send one.
            origins=[None, *self.allow_origins],
            process_request=self._check_token if self._token is not None else None,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            if on_ready is not None:
                on_ready(self.host, self.port)
            await stop.wait()
            self._stopping = True
            try:
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                log.warning("a policy call is still running after %.1f s; closing connections anyway", self.drain_timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        return self._idle.is_set()

    def run(self, on_ready: Callable[[str, int], None] | None = None) -> bool:
        """Blocking: serve until SIGTERM or SIGINT (call from the main thread); returns what ``serve`` returns."""

        async def main() -> bool:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            return await self.serve(stop, on_ready)

        return asyncio.run(main())


def _announce(host: str, port: int) -> None:
    print(json.dumps({"event": "listening", "host": host, "port": port}), flush=True)


def main(argv: list[str] | None = None) -> None:
    from vla_zoo.deploy.loading import add_policy_arguments, policy_from_args

    parser = argparse.ArgumentParser(prog="python -m vla_zoo.deploy.server", description=__doc__.split("\n\n")[0])
    add_policy_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="0.0.0.0 to accept other machines, which needs a token (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    parser.add_argument(
        "--token", default=None,
        help=f"shared secret clients must send (default: ${TOKEN_ENV}, which keeps it out of the process list); "
        "required unless --host is loopback. Make one with `python -c 'import secrets; print(secrets.token_urlsafe())'`",
    )
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser Origin to accept, e.g. http://localhost:3000 (repeatable; default: none)")
    parser.add_argument("--max-message-mb", type=float, default=None,
                        help="largest request (default: what the policy's metadata says an observation may hold)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(args.host):  # before loading a model that would only be thrown away
        parser.error(f"--host {args.host} accepts other machines: set a shared secret with --token or {TOKEN_ENV}")
    max_bytes = int(args.max_message_mb * 2**20) if args.max_message_mb is not None else None
    server = PolicyServer(policy_from_args(args), args.host, args.port, max_bytes, token=token,
                          allow_origins=args.allow_origin)
    if not server.run(on_ready=_announce):
        # The policy thread is stuck; the interpreter would wait for it forever at exit.
        log.error("exiting with a policy call still running")
        os._exit(1)
    log.info("shut down")


if __name__ == "__main__":
    main()
