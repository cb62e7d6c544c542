"""Client for ``vla_zoo.deploy.server``: the same interface as a local policy, so switching is one line::

    policy = Policy.from_checkpoint("last.ckpt")          # in this process
    policy = RemotePolicy("gpu-box", 8000, token=secret)    # served elsewhere (token: default $VLA_ZOO_TOKEN)

    policy.reset()
    chunk = policy.get_action(observation)["actions"]      # float32 [H, A]
"""

from __future__ import annotations

import os
import threading
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from vla_zoo.deploy.codec import packb, unpackb
from vla_zoo.deploy.server import MAX_MESSAGE_BYTES, TOKEN_ENV


class PolicyServerError(RuntimeError):
    """The server rejected a request; ``kind`` is its error type (e.g. ``InvalidObservation``), the text its message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class RemotePolicy:
    """A policy served by ``python -m vla_zoo.deploy.server``, reached over one websocket connection.

    Calls are synchronous (one request, one reply) and safe to make from several threads. ``timeout`` bounds each
    reply; after a timeout the connection is closed, because a late reply would otherwise answer the next request.
    ``token``: the server's shared secret (default: the ``VLA_ZOO_TOKEN`` environment variable, if set).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 30.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES, token: str | None = None,
    ) -> None:
        self.url = f"ws://{host}:{port}"
        self.timeout = timeout
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token is not None else None
        try:
            # proxy=None: a robot talks straight to its policy server, never through an HTTP proxy from the environment.
            self._connection = connect(
                self.url, open_timeout=timeout, max_size=max_message_bytes, compression=None, proxy=None, legacy=True,
                additional_headers=headers,
            )
        except InvalidStatus as e:  # the server refused the handshake (401: token; 403: origin)
            body = e.response.body.decode("utf-8", "replace").strip()
            raise PermissionError(f"policy server {self.url} refused the connection: HTTP "
                                  f"{e.response.status_code}: {body}") from None
        self._lock = threading.Lock()

    def _request(self, request: dict[str, Any]) -> Any:
        payload = packb(request)
        with self._lock:
            try:
                self._connection.send(payload)
                reply = unpackb(self._connection.recv(timeout=self.timeout, decode=False))
            except TimeoutError:
                self._connection.close()
                raise TimeoutError(f"no reply from {self.url} within {self.timeout} s; connection closed") from None
            except ConnectionClosed as e:
                raise ConnectionError(f"connection to policy server {self.url} is closed ({e})") from None
        if "error" in reply:
            raise PolicyServerError(reply["error"]["type"], reply["error"]["message"])
        return reply["result"]

    def get_action(self, observation: dict[str, Any]) -> dict[str, Any]:
        return self._request({"type": "get_action", "observation": observation})

    def metadata(self) -> dict[str, Any]:
        return self._request({"type": "metadata"})

    def reset(self) -> None:
        self._request({"type": "reset"})

    def ping(self) -> None:
        self._request({"type": "ping"})

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
