"""Deployment: serve a policy over the network, call it remotely, replay recorded actions.

- ``PolicyServer`` / ``python -m vla_zoo.deploy.server``: one policy behind a websocket, msgpack + numpy arrays.
- ``RemotePolicy``: the client, with the local policy's ``get_action`` / ``metadata`` / ``reset`` interface.
- ``ReplayPolicy``: returns recorded action chunks, to check an environment integration without a model.
- ``validate_observation``: the check every request passes before reaching the policy.
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first access (PEP 562) so that `python -m vla_zoo.deploy.server` does not import the server module
# twice (once through this package, once as __main__).
_EXPORTS = {
    "CodecError": "vla_zoo.deploy.codec",
    "ObservationError": "vla_zoo.deploy.validation",
    "PolicyServer": "vla_zoo.deploy.server",
    "PolicyServerError": "vla_zoo.deploy.client",
    "RemotePolicy": "vla_zoo.deploy.client",
    "ReplayPolicy": "vla_zoo.deploy.replay",
    "validate_observation": "vla_zoo.deploy.validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vla_zoo.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
