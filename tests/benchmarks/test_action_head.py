"""The head benchmark's baseline is our head with the released structure swapped in, so its speed-ups compare the
structure only: the same chunk from the same noise, the same training loss."""

from __future__ import annotations

import torch

from benchmarks.action_head import bench_inference, bench_train_step

TINY = dict(num_embodiments=8, max_state_dim=8, max_action_dim=8, horizon=4, hidden_dim=32, num_layers=2,
            num_heads=2, cross_attention_dim=32, embodiment_hidden_dim=32)


def test_released_structure_computes_the_same_chunk() -> None:
    cpu = torch.device("cpu")
    fp32 = bench_inference(TINY, cpu, vl_tokens=6, repeats=1)
    assert set(fp32["seconds"]) == {"ours", "ours_no_kv_cache", "released"}
    assert max(fp32["max_abs_difference_vs_released_fp32"].values()) < 1e-5
    bf16 = bench_inference(TINY, cpu, vl_tokens=6, repeats=1, precision="bf16-mixed")
    assert bf16["ours_weights"] == "bfloat16" and bf16["released_runs"] == "bf16 autocast, fp32 weights"
    assert {"released_fp32", "released_bf16_weights"} <= set(bf16["seconds"])
    assert 0 < max(bf16["max_abs_difference_vs_released_fp32"].values()) < 0.5  # bf16 rounding, not another model


def test_train_step_runs_both_variants_with_adamw() -> None:
    r = bench_train_step(TINY, torch.device("cpu"), batch=4, num_present=4, vl_tokens=6, repeats=1, peak_flops=1e9)
    for variant in ("grouped", "per_sample_gather"):
        assert r[variant]["flops_per_step"] > 0 and r[variant]["seconds_per_step"] > 0
    # the same matmuls, except the baseline's batched per-sample weights
    assert abs(r["grouped"]["flops_per_step"] / r["per_sample_gather"]["flops_per_step"] - 1) < 0.2
    assert r["optimizer"] == "AdamW" and r["target_speedup"] == 1.5
