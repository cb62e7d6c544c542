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


def describe() -> dict[str, object]:
    """CPU model, cores, torch version and intra-op threads: enough to tell whether two figures are comparable."""
    import torch

    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
