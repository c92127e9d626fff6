"""The ``aggregation`` part of ``benchmarks/gpu.py``: the LoRA aggregation maths on the device."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_common import Sizes, release

Factors = tuple[torch.Tensor, torch.Tensor]
Rule = Callable[[list[torch.Tensor], list[torch.Tensor], list[float], int, float], Factors]


def _fedit(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import weighted_mean

    return weighted_mean(bs, w), weighted_mean(as_, w)


def _flora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import stack_factors

    return stack_factors(bs, as_, w)


def _flexlora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import flexlora_aggregate

    return flexlora_aggregate(bs, as_, w, None, [r], [s])[0]


def _flexlora_streaming(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.streaming_svd import StreamingSVD

    streaming = StreamingSVD(r, bs[0].device)  # where the strategy's server_device puts it
    for b, a, weight in zip(bs, as_, w, strict=True):
        streaming.add("m", b, a, weight * s)
    u, singular, v = streaming.top_svd("m", 1.0 / sum(w))  # back on the CPU
    return u * singular, v.mT


def _hetlora(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import hetlora_aggregate

    return hetlora_aggregate(bs, as_, w, r)


def _fedex(
    bs: list[torch.Tensor], as_: list[torch.Tensor], w: list[float], r: int, s: float
) -> Factors:
    from fedpeft.strategies.lora_math import fedex_residual

    return fedex_residual(bs, as_, w, s)


#: rule -> the lora_math call its strategy makes per adapted matrix (B-like, A-like result)
RULES: dict[str, Rule] = {
    "fedit (fedavg)": _fedit,
    "flora (stack)": _flora,
    "flexlora (factored SVD)": _flexlora,
    "flexlora (streaming SVD)": _flexlora_streaming,
    "hetlora (norm-weighted)": _hetlora,
    "fedex_lora (residual)": _fedex,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(states: list[dict[str, torch.Tensor]]) -> torch.device:
    return next(iter(states[0].values())).device


def aggregate_all(
    rule: Rule,
    states: list[dict[str, torch.Tensor]],
    pairs: list[tuple[str, str]],
    weights: list[float],
    rank: int,
    device: torch.device,
) -> tuple[float, Factors]:
    """Seconds to apply ``rule`` to every adapted matrix, and the first matrix's result."""
    _sync(device)
    started = time.perf_counter()
    first: Factors | None = None
    for a_key, b_key in pairs:
        out = rule([s[b_key] for s in states], [s[a_key] for s in states], weights, rank, 2.0)
        first = out if first is None else first
    _sync(device)
    assert first is not None
    return time.perf_counter() - started, first


def aggregation_part(device: torch.device, sizes: Sizes, work: Path) -> dict[str, Any]:
    """The aggregation benchmark's updates, aggregated on ``device`` against the CPU."""
    from aggregation import SHAPES, adapter

    from fedpeft.adapters import lora_pairs

    layers, d, r, _ = SHAPES[sizes.agg_shape]
    rows = []
    for k in sizes.agg_clients:
        states = [adapter(sizes.agg_shape, seed) for seed in range(k)]
        pairs = list(lora_pairs(list(states[0])).values())
        weights = [float(8 + i % 5) for i in range(k)]  # as benchmarks/aggregation.py
        _sync(device)
        started = time.perf_counter()
        moved = [{key: t.to(device) for key, t in s.items()} for s in states]
        _sync(device)
        transfer = time.perf_counter() - started
        for name, rule in RULES.items():
            for warm in (states, moved):  # first calls load kernels and libraries
                aggregate_all(rule, warm[:2], pairs[:1], weights[:2], r, _device_of(warm))
            cpu_s, (cpu_b, cpu_a) = aggregate_all(
                rule, states, pairs, weights, r, torch.device("cpu")
            )
            dev_s, (dev_b, dev_a) = aggregate_all(rule, moved, pairs, weights, r, device)
            reference = cpu_b @ cpu_a  # the first matrix's aggregate, as B @ A
            diff = float((dev_b @ dev_a).cpu().sub(reference).norm() / reference.norm())
            rows.append(
                {
                    "rule": name,
                    "clients": k,
                    "modules": len(pairs),
                    "d": d,
                    "r": r,
                    "cpu_s": cpu_s,
                    "device_s": dev_s,
                    "transfer_s": transfer,
                    "speedup": cpu_s / dev_s,
                    "rel_diff": diff,
                }
            )
            print(
                f"aggregation K={k:<4} {name:24} cpu {cpu_s:7.3f} s  {device.type} "
                f"{dev_s:7.3f} s  ({cpu_s / dev_s:5.1f}x)  diff {diff:.1e}",
                flush=True,
            )
        del states, moved
        release(device)
    return {
        "device": str(device),
        "shape": {"name": sizes.agg_shape, "layers": layers, "d": d, "r": r},
        "note": "strategies aggregate on the CPU (aggregate_train takes no device); these are "
        "the strategies/lora_math.py functions they call, on tensors of each device",
        "rows": rows,
    }
