"""What machine a measurement ran on, for every benchmark's JSON.

The project's "2-core machine" is not one machine: the same training step has run at very different speeds on the
CPUs it was given (``benchmarks/RESULTS.md``, "The machine"). Ratios measured in one process stay comparable across
such machines; absolute times do not, so every benchmark records the CPU it ran on next to its figures.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU as the kernel reports it (``/proc/cpuinfo``): model name, family / model / stepping and clock,
    since a VM may show only a vendor name ("AMD EPYC"); else what ``platform`` knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    detail = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    if "cpu MHz" in fields:
        detail += f", {float(fields['cpu MHz']):.0f} MHz"
    return f"{fields['model name']} ({detail})" if detail else fields["model name"]


#: CPU flags of bf16 arithmetic units, best first: Intel AMX tiles, AVX-512 BF16 dot products (x86), and Arm's
#: BF16 extension (``Features: ... bf16``). Without one, oneDNN emulates bf16 and runs far slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_flags() -> set[str]:
    """The first processor's feature flags (``flags`` on x86, ``Features`` on Arm); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def bf16_units(device: str | object = "cpu") -> str | None:
    """What does bf16 arithmetic in hardware on ``device``: a CPU flag from ``BF16_CPU_FLAGS`` or the GPU's name;
    None where bf16 would only be emulated."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.cuda.get_device_name(device)
        return None
    if device.type != "cpu":
        return None
    flags = cpu_flags()
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def describe() -> dict[str, object]:
    """CPU model, cores, torch version, intra-op threads and bf16 units: enough to tell whether two figures are
    comparable."""
    import torch

    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16_units": bf16_units("cpu"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16_units"] = bf16_units("cuda") is not None
    return info
