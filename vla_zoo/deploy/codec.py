"""Wire format between a policy server and its clients: msgpack, with numpy arrays as (dtype, shape, raw bytes).

An array travels as the map ``{"__ndarray__": <bytes>, "dtype": "<f4", "shape": [H, A]}``, which any msgpack
library in any language can produce or read. Decoding is strict: the input is untrusted network data, so only
numeric dtypes are accepted (never ``object``; nothing is ever unpickled), the byte count must match dtype and
shape exactly, and every failure raises ``CodecError`` with a message that says what was wrong.
"""

from __future__ import annotations

import math
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


def unpackb(data: bytes) -> Any:
    """Strict inverse of :func:`packb`; raises :class:`CodecError` naming the problem for any malformed input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected a binary msgpack message, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, raw=False, object_hook=_object_hook, ext_hook=_ext_hook, strict_map_key=True)
    except CodecError:
        raise
    except Exception as e:  # msgpack signals malformed input through many exception types (ExtraData, FormatError, ...)
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CodecError(f"message is not valid msgpack ({detail})") from None
