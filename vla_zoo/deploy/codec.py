"""Wire format between a policy server and its clients: msgpack, with numpy arrays as (dtype, shape, raw bytes).

An array travels as the map ``{"__ndarray__": <bytes>, "dtype": "<f4", "shape": [H, A]}``, which any msgpack
library in any language can produce or read. Decoding is strict: the input is untrusted network data, so only
numeric dtypes are accepted (never ``object``; nothing is ever unpickled), the byte count must match dtype and
shape exactly, and every failure raises ``CodecError`` with a message that says what was wrong.

A server also passes ``Limits``: msgpack builds one Python object per element before anything can look at the
message, so a few megabytes of empty maps would otherwise become gigabytes of dicts. The limits bound every string,
binary, array and map, and the number of maps and arrays in one message, so decoding stops early and cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

ARRAY_KEY = "__ndarray__"
_ARRAY_FIELDS = {ARRAY_KEY, "dtype", "shape"}
# bool, signed/unsigned integers, floats: everything a policy exchanges; object/str/void/datetime are refused.
_ALLOWED_KINDS = {"b", "i", "u", "f"}
_MAX_NDIM = 32


class CodecError(ValueError):
    """A message that is not valid msgpack or holds a malformed array."""


@dataclass(frozen=True)
class Limits:
    """The largest message ``unpackb`` decodes: bytes in all, bytes per str / bin, elements per array / map, and maps
    and arrays in all (each array or map is checked before msgpack allocates it; the count stops a message of many
    small ones)."""

    max_message_bytes: int
    max_str_len: int
    max_bin_len: int
    max_array_len: int
    max_map_len: int
    max_containers: int


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}: only bool, int, uint, float")
        arr = np.ascontiguousarray(obj)
        return {ARRAY_KEY: arr.tobytes(), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def _decode_array(d: dict) -> np.ndarray:
    if set(d) != _ARRAY_FIELDS:
        raise CodecError(f"array map must have exactly the keys {sorted(_ARRAY_FIELDS)}, got {sorted(d)}")
    data, dtype_name, shape = d[ARRAY_KEY], d["dtype"], d["shape"]
    if not isinstance(data, bytes):
        raise CodecError(f"array data must be msgpack bin (bytes), got {type(data).__name__}")
    if not isinstance(dtype_name, str):
        raise CodecError(f"array dtype must be a string such as '<f4', got {type(dtype_name).__name__}")
    try:
        dtype = np.dtype(dtype_name)
    except (TypeError, ValueError) as e:
        raise CodecError(f"unknown array dtype {dtype_name!r} ({e})") from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CodecError(f"array dtype {dtype_name!r} is not allowed: only bool, int, uint and float arrays")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise CodecError(f"array shape must be a list of at most {_MAX_NDIM} non-negative ints, got {shape!r}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise CodecError(
            f"array of dtype {dtype.str} and shape {shape} needs {expected} bytes, the message carries {len(data)}"
        )
    try:
        arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:  # e.g. a zero-size array with a dimension beyond numpy's index range
        raise CodecError(f"array shape {shape} is not valid ({e})") from None
    # A copy makes the array writable (frombuffer over bytes is read-only) and native-endian for torch.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _object_hook(d: dict) -> Any:
    return _decode_array(d) if ARRAY_KEY in d else d


def _ext_hook(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not accepted")


def packb(obj: Any) -> bytes:
    """Serialise dicts, lists, str, numbers, bytes, None and numpy arrays/scalars; anything else is a TypeError."""
    return msgpack.packb(obj, default=_encode_default, use_bin_type=True)


def _bounded_hooks(limits: Limits) -> dict[str, Any]:
    """msgpack hooks that count the maps and arrays of one message and stop once there are too many."""
    left = [limits.max_containers]

    def spend() -> None:
        left[0] -= 1
        if left[0] < 0:
            raise CodecError(f"message exceeds this server's limit of {limits.max_containers} maps and arrays "
                             "(a request needs two per array and a few more)")

    def object_hook(d: dict) -> Any:
        spend()
        return _object_hook(d)

    def list_hook(items: list) -> list:
        spend()
        return items

    return {"object_hook": object_hook, "list_hook": list_hook}


def unpackb(data: bytes, limits: Limits | None = None) -> Any:
    """Strict inverse of :func:`packb`; raises :class:`CodecError` naming the problem for any malformed input, or
    for input beyond ``limits`` (unbounded without them: for replies from a server this process trusts)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary msgpack message, got {type(data).__name__}")
    options: dict[str, Any] = {"object_hook": _object_hook}
    if limits is not None:
        if len(data) > limits.max_message_bytes:
            raise CodecError(f"message of {len(data)} bytes exceeds this server's limit of {limits.max_message_bytes}")
        options.update(
            _bounded_hooks(limits), max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len, max_map_len=limits.max_map_len,
        )
    try:
        return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True, **options)
    except CodecError:
        raise
    except Exception as e:  # msgpack signals malformed input through many exception types (ExtraData, FormatError, ...)
        if limits is not None and "exceeds max_" in str(e):  # msgpack's ValueError for a length over a limit
            raise CodecError(f"message exceeds this server's limits ({e}); {limits}") from None
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CodecError(f"message is not valid msgpack ({detail})") from None
