"""Benchmarks record the machine they ran on: the CPU must be the kernel's, not a placeholder."""

import torch

from vla_zoo.machine import cpu_model, describe


def test_describe_names_this_cpu_and_thread_count():
    info = describe()
    assert info["threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    except OSError:  # not Linux: whatever platform reports, but never empty
        names = set()
    assert info["cpu"], info
    if names:  # the kernel's model name leads, then family / model / stepping
        assert any(info["cpu"].startswith(name) for name in names), (info["cpu"], names)
        assert "family" in info["cpu"]
    assert cpu_model() == info["cpu"]
