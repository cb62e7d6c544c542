"""Benchmark of the flow-matching DiT action head against the released N1 head's structure; prints one JSON object.

The baseline is this head with the released code's two structural choices swapped in, same weights: per-sample
gathered adapters (a dense ``[E, in, out]`` weight indexed by embodiment, which materialises B weight copies and
gets a dense gradient for all E slots) and cross-attention K/V recomputed at every Euler step. Each measurement
runs in one process, the two arms interleaved, in every precision of ``--precisions`` (one run):

- training step (forward + backward of ``loss`` + AdamW step), batch 8 with 8 embodiments mixed, ``--train-vl-tokens``
  VL tokens: speed-up over the baseline (target >= 1.5x), peak memory, and achieved matmul FLOP/s as a fraction of
  this machine's matmul peak in the precision the matmuls run in (2048^3, measured in the same run, the larger of
  the measurements at start and end; target >= 0.5);
- inference of one H-action chunk, K = 4 Euler steps, batch 1, ``--vl-tokens`` VL tokens: speed-up over the
  baseline (target >= 2x). In ``32-true`` both arms hold fp32 weights. In ``bf16-mixed`` our head holds bf16
  weights cast once (``ours``: all of them, ``Policy(precision="bf16-true")``; ``ours_bf16_mixed``: the matmul
  weights, under autocast, ``Policy(precision="bf16-mixed")``), and the baseline runs under bf16 autocast (its
  weights cast on every call) and, reported beside it, with bf16 weights too; ``vs_released_fp32`` compares with the
  baseline's fp32 chunk (batch 1 is bound by reading weights: halving the bytes read counts, as does the cache);
  ``kv_cache_speedup`` isolates the cache (our head with and without it);
- peak memory of the embodiment adapters (state encoder, action encoder, action decoder; forward + backward) at
  batch 128, grouped by embodiment vs per-sample weight gathering (target <= 1/4).

Peak memory on CPU is the peak of live tensor storage allocated inside the measured call (tracked per storage
through a dispatch mode), plus the parameters that already existed; on CUDA it is ``max_memory_allocated``.

    python benchmarks/action_head.py                   # N1 sizes (an N1 step takes seconds on a 2-core CPU)
    python benchmarks/action_head.py --size medium     # 1/2 width, 1/2 depth (~150 M parameters)
    python benchmarks/action_head.py --size small      # tiny sizes, a few seconds
    python benchmarks/action_head.py --device cuda --train-repeats 10 --inference-repeats 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from components.action_head import FlowMatchingActionHead
from components.embodiment import ActionDecoder, ActionEncoder, EmbodimentGroups, EmbodimentLinear, StateEncoder
from vla_zoo.machine import bf16_units, describe

N1 = dict(num_embodiments=32, max_state_dim=64, max_action_dim=32, horizon=16, hidden_dim=1536, num_layers=16,
          num_heads=32, cross_attention_dim=1536, embodiment_hidden_dim=1024)
MEDIUM = dict(num_embodiments=32, max_state_dim=64, max_action_dim=32, horizon=16, hidden_dim=768, num_layers=8,
              num_heads=16, cross_attention_dim=768, embodiment_hidden_dim=512)
SMALL = dict(num_embodiments=32, max_state_dim=64, max_action_dim=32, horizon=16, hidden_dim=256, num_layers=4,
             num_heads=4, cross_attention_dim=256, embodiment_hidden_dim=256)
SIZES = {"n1": N1, "medium": MEDIUM, "small": SMALL}
TARGETS = {"train_speedup": 1.5, "fraction_of_matmul_peak": 0.5, "inference_speedup": 2.0, "adapter_memory_ratio": 0.25}


# ----------------------------------------------------------------------------------------------- baselines
class PerSampleGatherLinear(torch.nn.Module):
    """The released code's adapter layer: one dense ``[E, in, out]`` parameter, indexed per sample, which
    materialises B weight copies ``[B, in, out]`` and gets a dense gradient for all E slots."""

    def __init__(self, layer: EmbodimentLinear) -> None:
        super().__init__()
        weight, bias = layer.dense()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)

    def forward(self, x: torch.Tensor, embodiment) -> torch.Tensor:
        if isinstance(embodiment, EmbodimentGroups):
            slots = torch.tensor(embodiment.slots, device=x.device)
            counts = torch.tensor(embodiment.counts, device=x.device)
            embodiment = torch.repeat_interleave(slots, counts)[embodiment.inverse]
        w, b = self.weight[embodiment], self.bias[embodiment]  # [B, in, out], [B, out]
        y = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), w) + b[:, None]
        return y.view(*x.shape[:-1], -1)


class GatherAdapterSwitch:
    """Swaps every adapter layer of ``module`` for (or back from) its per-sample-gather twin, same weights.

    The twins are built once and kept here (not registered on ``module``, so they never show up in its parameters
    or state dict), and switching back and forth costs nothing per call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.grouped = {n: m for n, m in module.named_modules() if isinstance(m, EmbodimentLinear)}
        self.gather: dict[str, PerSampleGatherLinear] = {}

    def use(self, gather: bool) -> torch.nn.Module:
        for name, layer in self.grouped.items():
            parent, _, child = name.rpartition(".")
            if gather and name not in self.gather:
                self.gather[name] = PerSampleGatherLinear(layer).to(next(layer.parameters()).device)
            outgoing = layer if gather else self.gather.get(name)
            if outgoing is not None:  # its gradients would otherwise stay allocated while the other variant runs
                for p in outgoing.parameters():
                    p.grad = None
            setattr(self.module.get_submodule(parent), child, self.gather[name] if gather else layer)
        return self.module


# ----------------------------------------------------------------------------------------------- measuring
class LiveTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated while active (each storage counted once, released when it dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: set[int] = set()
        self.current = self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # outputs sharing an input's storage (views, in-place ops) allocate nothing
        inputs = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.live and key not in inputs:
                    self.live.add(key)
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def peak_memory(fn, device: torch.device, existing_bytes: int) -> int:
    """Peak bytes while running ``fn``: allocations inside it plus ``existing_bytes`` (parameters) on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with LiveTensorMemory() as tracker:
        fn()
    return existing_bytes + tracker.peak


def count_flops(fn) -> int:
    # torch's counter has no formula for the CPU flash-attention kernels; use its generic SDPA formulas.
    cpu_sdpa = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


#: What ``timed`` reads: wall-clock seconds, or this process's CPU seconds (``--clock cpu``). On a CPU shared with
#: other jobs, a one-thread run's CPU time leaves out the time it waited for a core; wall time does not.
CLOCK = {"clock": time.perf_counter}


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    clock = CLOCK["clock"]
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return times


def autocast(device: torch.device, precision: str):
    """Lightning's ``bf16-mixed``: fp32 weights, matmuls in bf16 under autocast; ``32-true``: nothing."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 7,
                      dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    return 2 * n**3 / min(timed(lambda: a @ b, device, repeats))


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- inputs
def head_inputs(cfg: dict, batch: int, num_present: int, vl_tokens: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vl = torch.randn(batch, vl_tokens, cfg["cross_attention_dim"], generator=g)
    lengths = torch.randint(vl_tokens // 2, vl_tokens + 1, (batch,), generator=g)
    vl_mask = torch.arange(vl_tokens)[None] < lengths[:, None]  # [B, S]: right-padded VL tokens
    ids = torch.arange(batch) % num_present  # num_present embodiments, mixed in one batch
    state = torch.randn(batch, cfg["max_state_dim"], generator=g)
    actions = torch.randn(batch, cfg["horizon"], cfg["max_action_dim"], generator=g)
    action_mask = torch.zeros_like(actions, dtype=torch.bool)
    for i, e in enumerate(ids.tolist()):  # embodiments of different action dims
        action_mask[i, :, : min(7 + 3 * e, cfg["max_action_dim"])] = True
    return [x.to(device) for x in (vl, vl_mask, state, actions, action_mask, ids)]


# ----------------------------------------------------------------------------------------------- benchmarks
def bench_train_step(cfg, device, batch, num_present, vl_tokens, repeats, peak_flops, precision="32-true"):
    vl, vl_mask, state, actions, action_mask, ids = head_inputs(cfg, batch, num_present, vl_tokens, device)
    torch.manual_seed(0)
    # one head for both variants (an N1 head plus gradients is ~7 GB); the baseline only swaps the adapters' forward
    head = FlowMatchingActionHead(**cfg).to(device).train()
    variants = {"grouped": False, "per_sample_gather": True}
    switch = GatherAdapterSwitch(head)
    optimizers = {}
    for name, gather in variants.items():  # each variant's own AdamW over the parameters it trains
        switch.use(gather)
        optimizers[name] = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-5,
                                             betas=(0.95, 0.999), weight_decay=1e-5)
    current = {}

    def step():
        optimizer = optimizers[current["name"]]
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = head.loss(vl, vl_mask, state, actions, action_mask, ids)["loss"]
        loss.backward()
        optimizer.step()

    results, times = {}, {name: [] for name in variants}
    for name, gather in variants.items():
        switch.use(gather)
        current["name"] = name
        flops = count_flops(step)  # also the warm-up (AdamW's state is allocated here)
        results[name] = dict(flops_per_step=flops, peak_memory_bytes=peak_memory(step, device, param_bytes(head)))
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit both alike
        for name, gather in variants.items():
            switch.use(gather)
            current["name"] = name
            times[name] += timed(step, device, 1)
    switch.use(False)
    for name, r in results.items():
        seconds = statistics.median(times[name])
        r.update(seconds_per_step=seconds, samples_per_s=batch / seconds, achieved_flops_per_s=r["flops_per_step"] / seconds,
                 fraction_of_matmul_peak=r["flops_per_step"] / seconds / peak_flops)
    g, b = results["grouped"], results["per_sample_gather"]
    speedup = statistics.median(t_b / t_g for t_g, t_b in zip(times["grouped"], times["per_sample_gather"]))
    return dict(batch=batch, embodiments_in_batch=num_present, vl_tokens=vl_tokens, optimizer="AdamW", **results,
                speedup_vs_gather=g["samples_per_s"] / b["samples_per_s"], speedup_per_round_median=speedup,
                memory_ratio_vs_gather=g["peak_memory_bytes"] / b["peak_memory_bytes"],
                target_speedup=TARGETS["train_speedup"],
                target_fraction_of_matmul_peak=TARGETS["fraction_of_matmul_peak"],
                meets_speedup_target=g["samples_per_s"] / b["samples_per_s"] >= TARGETS["train_speedup"],
                meets_target=g["fraction_of_matmul_peak"] >= TARGETS["fraction_of_matmul_peak"])


def bench_inference(cfg, device, vl_tokens, repeats, precision="32-true"):
    """One chunk at batch 1: our head (grouped adapters, K-V cache; bf16 weights cast once under bf16) against the
    released structure (gathered adapters, K/V recomputed every Euler step), arms interleaved."""
    torch.manual_seed(0)
    head = FlowMatchingActionHead(**cfg).to(device).eval()
    vl, vl_mask, state, _, _, ids = head_inputs(cfg, 1, 1, vl_tokens, device)
    vl_mask[:] = True
    bf16 = precision == "bf16-mixed"
    heads = {"fp32": head}
    if bf16:
        heads["bf16_true"] = copy.deepcopy(head).to(torch.bfloat16)  # cast once, as Policy(precision="bf16-true")
        heads["bf16_mixed"] = mixed = copy.deepcopy(head)  # as Policy(precision="bf16-mixed"): matmul weights only
        for layer in mixed.modules():
            if isinstance(layer, (torch.nn.Linear, EmbodimentLinear)):
                layer.to(torch.bfloat16)
    switches = {name: GatherAdapterSwitch(h) for name, h in heads.items()}
    for switch in switches.values():
        switch.use(True)  # builds the gathered twins once (their weights copied from the grouped ones)
        switch.use(False)

    def sample(weights: str, gather: bool, cache: bool, use_autocast: bool) -> torch.Tensor:
        model = switches[weights].use(gather)
        dtype = torch.bfloat16 if weights == "bf16_true" else torch.float32
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with ctx:
            return model.sample(vl.to(dtype), vl_mask, state.to(dtype), ids, num_steps=4,
                                generator=torch.Generator(device).manual_seed(0), use_kv_cache=cache)

    weights = "bf16_true" if bf16 else "fp32"
    arms = {
        "ours": dict(weights=weights, gather=False, cache=True, use_autocast=False),
        "ours_no_kv_cache": dict(weights=weights, gather=False, cache=False, use_autocast=False),
        "released": dict(weights="fp32", gather=True, cache=False, use_autocast=bf16),
        "released_fp32": dict(weights="fp32", gather=True, cache=False, use_autocast=False),
    }
    if bf16:
        arms["ours_bf16_mixed"] = dict(weights="bf16_mixed", gather=False, cache=True, use_autocast=True)
        arms["released_bf16_weights"] = dict(weights="bf16_true", gather=True, cache=False, use_autocast=False)
    else:
        del arms["released_fp32"]  # the same as "released"
    chunks = {name: sample(**arm).float() for name, arm in arms.items()}  # also the warm-up
    times = {name: [] for name in arms}
    for _ in range(repeats):  # interleaved, so load changes on a shared machine hit all arms alike
        for name, arm in arms.items():
            times[name] += timed(lambda arm=arm: sample(**arm), device, 1)
    switches[weights].use(False)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    released_fp32 = seconds.get("released_fp32", seconds["released"])
    speedup = seconds["released"] / seconds["ours"]
    if bf16:  # Policy's default bf16 (matmul weights bf16, norms and residual stream fp32 under autocast)
        extra = dict(ours_bf16_mixed_speedup=seconds["released"] / seconds["ours_bf16_mixed"],
                     ours_bf16_mixed_vs_released_fp32=released_fp32 / seconds["ours_bf16_mixed"])
    else:
        extra = {}
    return dict(**extra, batch=1, horizon=cfg["horizon"], num_steps=4, vl_tokens=vl_tokens,
                ours_weights="bfloat16" if bf16 else "float32",
                released_runs="bf16 autocast, fp32 weights" if bf16 else "fp32",
                seconds=seconds, speedup=speedup, vs_released_fp32=released_fp32 / seconds["ours"],
                kv_cache_speedup=seconds["ours_no_kv_cache"] / seconds["ours"],
                # same noise in every arm: how far the chunks lie from the fp32 released one (bf16 rounding only)
                max_abs_difference_vs_released_fp32={
                    name: float((c - chunks.get("released_fp32", chunks["released"])).abs().max())
                    for name, c in chunks.items()},
                target_speedup=TARGETS["inference_speedup"], meets_target=speedup >= TARGETS["inference_speedup"])


class Adapters(torch.nn.Module):
    """The three per-embodiment adapters of the head, as one module for the memory benchmark."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        E, w, hid = cfg["num_embodiments"], cfg["hidden_dim"], cfg["embodiment_hidden_dim"]
        self.state_encoder = StateEncoder(E, cfg["max_state_dim"], hid, w)
        self.action_encoder = ActionEncoder(E, cfg["max_action_dim"], w)
        self.action_decoder = ActionDecoder(E, hid, hid, cfg["max_action_dim"])

    def forward(self, state, actions, time_bucket, decoder_in, ids):
        groups = EmbodimentGroups.from_ids(ids)
        s = self.state_encoder(state[:, None], groups)  # [B, 1, w]
        a = self.action_encoder(actions, time_bucket, groups)  # [B, H, w]
        v = self.action_decoder(decoder_in, groups)  # [B, H, A_max]
        return s.square().mean() + a.square().mean() + v.square().mean()


def bench_adapters(cfg, device, batch, num_present):
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, cfg["max_state_dim"], generator=g).to(device)
    actions = torch.randn(batch, cfg["horizon"], cfg["max_action_dim"], generator=g).to(device)
    time_bucket = torch.randint(0, 1000, (batch,), generator=g).to(device)
    decoder_in = torch.randn(batch, cfg["horizon"], cfg["embodiment_hidden_dim"], generator=g).to(device)
    ids = (torch.arange(batch) % num_present).to(device)
    peaks = {}
    for name in ("grouped", "per_sample_gather"):
        torch.manual_seed(0)
        adapters = Adapters(cfg).to(device)
        if name == "per_sample_gather":
            GatherAdapterSwitch(adapters).use(True)

        def step():
            adapters.zero_grad(set_to_none=True)
            adapters(state, actions, time_bucket, decoder_in, ids).backward()

        step()  # warm-up
        params = param_bytes(adapters)
        peaks[name] = peak_memory(step, device, params)
        del adapters
    grouped, gather = peaks["grouped"], peaks["per_sample_gather"]
    # Both variants hold the same E x [in, out] parameters; the gather baseline also allocates B weight copies and a
    # dense gradient for all E slots, the grouped adapters a gradient for the slots present only. What each
    # allocates on top of the parameters is reported separately.
    return dict(batch=batch, embodiments_in_batch=num_present, parameter_bytes=params, grouped_peak_bytes=grouped,
                gather_peak_bytes=gather, ratio=grouped / gather,
                ratio_excluding_parameters=(grouped - params) / (gather - params), target_ratio=0.25,
                meets_target=grouped / gather <= 0.25,
                meets_target_excluding_parameters=(grouped - params) / (gather - params) <= 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="n1")
    parser.add_argument("--small", action="store_true", help="same as --size small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vl-tokens", type=int, default=300, help="VL tokens of the inference chunk")
    parser.add_argument("--train-vl-tokens", type=int, default=160, help="VL tokens of the training batch")
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--inference-repeats", type=int, default=3)
    parser.add_argument("--adapter-batch", type=int, default=128)
    parser.add_argument("--precisions", nargs="+", choices=["32-true", "bf16-mixed"], default=None,
                        help="as Lightning names them; bf16-mixed = fp32 weights + bf16 autocast (recipes/n1.yaml) "
                        "for training; default: 32-true, and bf16-mixed where the device has bf16 units")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=None,
                        help="a single precision (same as --precisions P)")
    parser.add_argument("--parts", nargs="+", choices=["train", "inference", "adapters"],
                        default=["train", "inference", "adapters"], help="which measurements to run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; on a shared, loaded CPU one thread avoids OpenMP spin-waits")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time (CPU device, with --threads 1: immune to waiting for a "
                        "core on a loaded machine; with more threads it would count OpenMP spin-waits)")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures CPU runs only")
        CLOCK["clock"] = time.process_time
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "small" if args.small else args.size
    cfg = SIZES[size]
    units = bf16_units(device)
    precisions = args.precisions or ([args.precision] if args.precision else
                                     ["32-true", "bf16-mixed"] if units else ["32-true"])

    report = dict(device=str(device), machine=describe(), threads=torch.get_num_threads(), clock=args.clock,
                  load_average_start=os.getloadavg()[0], sizes=size, config=cfg,
                  parameters=sum(p.numel() for p in FlowMatchingActionHead(**cfg).parameters()) if size != "n1" else
                  None, bf16_units=units, precisions=precisions, targets=TARGETS, results={})
    for precision in precisions:
        # The peak in the dtype the matmuls run in: a bf16 step is compared with bf16 matmul's peak.
        matmul_dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        peak_start = matmul_peak_flops(device, dtype=matmul_dtype)
        r = report["results"][precision] = dict(matmul_peak_flops_per_s_start=peak_start)
        if "train" in args.parts:
            r["train_step"] = bench_train_step(cfg, device, 8, 8, args.train_vl_tokens, args.train_repeats,
                                               peak_start, precision)
        if "inference" in args.parts:
            r["inference"] = bench_inference(cfg, device, args.vl_tokens, args.inference_repeats, precision)
        # the peak again at the end: the shared machine's load may have changed; the fraction uses the larger
        r["matmul_peak_flops_per_s_end"] = peak_end = matmul_peak_flops(device, dtype=matmul_dtype)
        if "train_step" in r and peak_end > peak_start:
            for variant in ("grouped", "per_sample_gather"):
                t = r["train_step"][variant]
                t["fraction_of_matmul_peak"] = t["achieved_flops_per_s"] / peak_end
            r["train_step"]["meets_target"] = (r["train_step"]["grouped"]["fraction_of_matmul_peak"]
                                               >= TARGETS["fraction_of_matmul_peak"])
    if "adapters" in args.parts:
        report["adapters"] = bench_adapters(cfg, device, args.adapter_batch, 8)
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
