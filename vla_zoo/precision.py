"""``trainer.precision: auto``: bf16-mixed where the machine has bf16 units and they are faster for this model.

bf16 is not faster everywhere: CPUs without bf16 units emulate it (hundreds of times slower than fp32), and even
with units a small model's matmuls can lose to autocast's per-call weight casts. So ``auto`` decides in two steps:

1. hardware: the CPU lists a bf16 flag (``vla_zoo.machine.BF16_CPU_FLAGS``) or the GPU supports bf16 natively;
   otherwise ``32-true`` without measuring;
2. a micro-measurement: forward + backward of one linear layer per distinct ``(in, out)`` shape of the model's
   linear layers and one self-attention per distinct head width of its attentions (``rows`` tokens each, weighted
   by how many layers share the shape), under bf16 autocast against fp32, in alternating rounds
   (``measure_speed``). ``bf16-mixed`` only if that is at least ``MIN_SPEEDUP`` times faster. Attention counts:
   torch's CPU flash-attention backward can be several times slower in bf16 than in fp32, enough to cancel what
   the linear layers gain.

The measurement is cached per machine, torch version, thread count and shape set in
``$XDG_CACHE_HOME/vla_zoo/precision_auto.json`` (default ``~/.cache``), so a rerun on the same machine decides the
same way without measuring. Processes that Lightning launches for the other ranks (``LOCAL_RANK`` set) take the
launching process's choice from ``VLA_ZOO_AUTO_PRECISION`` instead of measuring, so all ranks agree; on several
nodes set that variable (or an explicit precision) yourself.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from vla_zoo.machine import bf16_units, cpu_model

#: bf16 must be at least this much faster in the micro-measurement: below it, timing noise could flip the choice.
MIN_SPEEDUP = 1.1
#: Rows per measured matmul: a training batch at the recipes' sizes (32 samples x 16 tokens).
DEFAULT_ROWS = 512
#: Self-attention measured at this many tokens and heads, ``rows`` tokens in all (so ``rows / tokens`` sequences).
ATTENTION_TOKENS, ATTENTION_HEADS = 64, 4
#: Measured when no linear layer or attention can be found: a transformer block of width 1024 (four projections,
#: attention, a 4x FFN).
FALLBACK_SHAPES = {("linear", 1024, 1024): 4, ("attention", 64): 1, ("linear", 1024, 4096): 1,
                   ("linear", 4096, 1024): 1}
#: Environment variable carrying the launching process's choice to the processes of the other ranks.
ENV_CHOICE = "VLA_ZOO_AUTO_PRECISION"

Shapes = dict[tuple, int]  # ("linear", in, out) or ("attention", head_dim) -> how many
Measure = Callable[[Shapes, torch.device, int], dict[str, float]]


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16-mixed" or "32-true"
    reason: str  # one sentence for the log
    measurement: dict[str, float] | None = None  # {"fp32_s", "bf16_s"} when measured (or read from the cache)


def _head_dim(module: nn.Module) -> int | None:
    """The per-head width of an attention module (``head_dim``, or its input width over ``num_heads``); None if
    ``module`` does not look like one (neither attribute)."""
    head_dim, heads = getattr(module, "head_dim", None), getattr(module, "num_heads", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    if not isinstance(heads, int) or heads < 1:
        return None
    width = next((m.in_features for m in module.modules() if isinstance(m, nn.Linear)), None)
    return width // heads if width else None


def matmul_shapes(module: nn.Module) -> Shapes:
    """What ``module`` multiplies, with how many layers of each kind: ``("linear", in, out)`` for every linear
    layer (``nn.Linear`` and anything declaring ``in_features``/``out_features``, such as per-embodiment adapters),
    ``("attention", head_dim)`` for every attention (a module with ``head_dim`` or ``num_heads``; once per module,
    not again for what it contains)."""
    shapes: Counter[tuple[int, ...]] = Counter()
    inside_attention: set[str] = set()
    for name, layer in module.named_modules():
        fan_in, fan_out = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if isinstance(fan_in, int) and isinstance(fan_out, int):
            shapes[("linear", fan_in, fan_out)] += 1
        if any(name.startswith(prefix) for prefix in inside_attention):
            continue
        head_dim = _head_dim(layer)
        if head_dim is not None:
            shapes[("attention", head_dim)] += 1
            inside_attention.add(f"{name}.")
    return dict(shapes)


def planned_matmul_shapes(module: nn.Module) -> Shapes:
    """``matmul_shapes`` of ``module`` as it will train, including the parts its ``configure_model`` builds later
    (factories from YAML): those are built in a copy on the meta device, which holds no data and runs no kernels."""
    if not callable(getattr(module, "configure_model", None)):
        return matmul_shapes(module)
    memo: dict[int, object] = {}  # existing tensors map to data-less twins, so the copy costs no memory
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        probe = copy.deepcopy(module, memo)
        with torch.device("meta"):
            probe.configure_model()
    except Exception:  # a configure_model that needs the Trainer or real data: the layers that exist already
        return matmul_shapes(module)
    return matmul_shapes(probe)


def _operands(shape: tuple[int, ...], rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    if shape[0] == "linear":
        _, fan_in, fan_out = shape
        return (torch.randn(rows, fan_in, device=device, requires_grad=True),  # x [rows, in]
                torch.randn(fan_out, fan_in, device=device, requires_grad=True),  # weight [out, in]
                torch.zeros(fan_out, device=device, requires_grad=True))  # bias [out]
    # q, k, v [rows / ATTENTION_TOKENS, ATTENTION_HEADS, ATTENTION_TOKENS, head_dim]: self-attention over the rows
    batch = max(1, rows // ATTENTION_TOKENS)
    return tuple(torch.randn(batch, ATTENTION_HEADS, ATTENTION_TOKENS, shape[1], device=device, requires_grad=True)
                 for _ in range(3))


def measure_speed(shapes: Shapes, device: torch.device, rows: int = DEFAULT_ROWS, rounds: int = 7) -> dict[str, float]:
    """Seconds for forward + backward of everything in ``shapes`` (``matmul_shapes``) at ``rows`` rows, fp32
    against bf16 autocast (fp32 master weights, as ``bf16-mixed`` trains). Each round times all of it in fp32, then
    in bf16; the result is the median round of each, and ``speedup`` the median of the rounds' ratios, so load that
    comes and goes on a shared machine hits both arms of a round alike."""
    operands = {shape: _operands(shape, rows, device) for shape in shapes}

    def one_round(bf16: bool) -> float:
        total = 0.0
        for shape, count in shapes.items():
            tensors = operands[shape]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = F.linear(*tensors) if shape[0] == "linear" else F.scaled_dot_product_attention(*tensors)
            out.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total += count * (time.perf_counter() - start)
            for t in tensors:
                t.grad = None
        return total

    one_round(False), one_round(True)  # warm-up: oneDNN picks and caches its kernels
    fp32, bf16 = [], []
    for _ in range(rounds):
        fp32.append(one_round(False))
        bf16.append(one_round(True))
    return {"fp32_s": statistics.median(fp32), "bf16_s": statistics.median(bf16),
            "speedup": statistics.median(f / b for f, b in zip(fp32, bf16))}


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vla_zoo" / "precision_auto.json"


def _read_cache(path: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or half-written: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, measurement: dict[str, float]) -> None:
    data = _read_cache(path)
    data[key] = measurement
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: ranks or runs writing at once never leave a torn file
    except OSError:
        pass  # a read-only home only costs a measurement next time


def accelerator_device(accelerator: object) -> torch.device | None:
    """The device an ``accelerator`` setting trains on, for the choices ``auto`` measures (CPU, CUDA); else None."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cpu"):
        return torch.device("cpu")
    if name in ("gpu", "cuda") or name.startswith("cuda"):
        return torch.device("cuda")
    return None


def choose_precision(module: nn.Module | None, accelerator: object = "auto", rows: int = DEFAULT_ROWS,
                     measure: Measure | None = None, cache: Path | None = None) -> PrecisionChoice:
    """``bf16-mixed`` or ``32-true`` for training ``module`` on ``accelerator`` (module docstring has the rule)."""
    if ENV_CHOICE in os.environ and "LOCAL_RANK" in os.environ:
        return PrecisionChoice(os.environ[ENV_CHOICE], f"the launching process chose it ({ENV_CHOICE})")
    device = accelerator_device(accelerator)
    if device is None:
        return PrecisionChoice("32-true", f"accelerator {accelerator!r}: auto measures CPUs and CUDA GPUs only")
    units = bf16_units(device)
    if units is None:
        where = "this GPU" if device.type == "cuda" else f"this CPU ({cpu_model()}) lists none of the bf16 flags"
        return PrecisionChoice("32-true", f"no bf16 units: {where}; bf16 would be emulated")
    shapes = (planned_matmul_shapes(module) if module is not None else {}) or FALLBACK_SHAPES
    threads = torch.get_num_threads()
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    key = json.dumps([machine, torch.__version__, threads, rows, sorted(shapes.items(), key=str)])
    cache = cache or cache_file()
    measurement = _read_cache(cache).get(key)
    source = "cached"
    if not (isinstance(measurement, dict) and {"fp32_s", "bf16_s"} <= measurement.keys()):
        measurement = (measure or measure_speed)(shapes, device, rows)
        _write_cache(cache, key, measurement)
        source = "measured"
    speedup = measurement.get("speedup") or measurement["fp32_s"] / measurement["bf16_s"]
    layers = Counter(kind for (kind, *_), n in shapes.items() for _ in range(n))
    plural = "s" if threads != 1 else ""
    what = (f"{units}; the model's {layers['linear']} linear layers and {layers['attention']} attentions "
            f"({len(shapes)} shapes, {rows} rows, {threads} thread{plural}) ran forward + backward {speedup:.2f}x "
            f"as fast under bf16 autocast as in fp32 ({source}: {1e3 * measurement['bf16_s']:.2f} vs "
            f"{1e3 * measurement['fp32_s']:.2f} ms)")
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16-mixed", what, measurement)
    return PrecisionChoice("32-true", f"{what}, under the {MIN_SPEEDUP}x needed", measurement)


def resolve_auto(module: nn.Module | None, accelerator: object = "auto", **kwargs) -> PrecisionChoice:
    """``choose_precision`` and hand the choice to the processes Lightning launches for the other ranks."""
    choice = choose_precision(module, accelerator, **kwargs)
    os.environ[ENV_CHOICE] = choice.precision
    return choice


class BF16MixedPrecision(MixedPrecision):
    """Lightning's ``bf16-mixed`` that also clips gradients with fused optimisers (``AdamW(fused=True)``).

    Lightning refuses to clip when the optimiser unscales gradients itself, which matters only for fp16's loss
    scaler; bf16-mixed has no scaler, so its gradients are never scaled and plain clipping is correct."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None):
        kwargs = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        Precision.clip_gradients(self, optimizer, clip_val=clip_val, **kwargs)
