"""Expert-parallel placement: which device holds each expert (copy) of each MoE layer, from expected token loads.

Per layer: the copies are packed longest-processing-time first onto the least-loaded device with a free slot, slots
kept equal per device (they differ by at most one when copies do not divide evenly), and improved by local swaps
and moves off the busiest device. `replicas` extra copies are added one at a time (a replica splits its expert's
load evenly among the copies; copies of one expert sit on distinct devices), each to whichever of the hottest experts
(highest load per copy) packs best.
`round_robin` is the baseline: expert e on device e mod N, no replicas. Pure functions on lists (or tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compress.errors import UserError


@dataclass
class LayerPlacement:
    """One layer: the devices of every expert's copies and what each device then carries."""

    experts: list[list[int]]  # expert -> devices of its copies
    device_load: list[float]

    @property
    def max_load(self) -> float:
        """Load of the busiest device."""
        return max(self.device_load)

    @property
    def mean_load(self) -> float:
        """Mean device load (total load / devices)."""
        return sum(self.device_load) / len(self.device_load)

    @property
    def imbalance(self) -> float:
        """max / mean device load (1.0 = perfectly balanced; 1.0 for a layer with no load)."""
        return self.max_load / self.mean_load if self.mean_load > 0 else 1.0

    def device_experts(self) -> list[list[int]]:
        """Device -> expert ids it holds."""
        out: list[list[int]] = [[] for _ in self.device_load]
        for e, devs in enumerate(self.experts):
            for d in devs:
                out[d].append(e)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"experts": self.experts, "device_experts": self.device_experts(), "device_load": self.device_load,
                "max_load": self.max_load, "mean_load": self.mean_load, "max_over_mean": self.imbalance}


@dataclass
class Placement:
    """Every layer's placement and a summary across layers."""

    method: str
    devices: int
    replicas: int
    layers: list[LayerPlacement]

    def summary(self) -> dict[str, float]:
        """Mean and worst per-layer max/mean, and Σ max / Σ mean (the step time against the balanced ideal)."""
        ratios = [ly.imbalance for ly in self.layers]
        total_max, total_mean = sum(ly.max_load for ly in self.layers), sum(ly.mean_load for ly in self.layers)
        return {"max_over_mean_mean": sum(ratios) / len(ratios), "max_over_mean_worst": max(ratios),
                "sum_max_load": total_max, "sum_mean_load": total_mean,
                "overall_max_over_mean": total_max / total_mean if total_mean > 0 else 1.0}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"method": self.method, "devices": self.devices, "replicas": self.replicas,
                "layers": [ly.to_dict() for ly in self.layers], "summary": self.summary()}


def _check(loads: Any, devices: Any, replicas: Any) -> list[list[float]]:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise UserError(f"devices {devices!r}: need at least 1 device")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise UserError(f"replicas {replicas!r}: give a number of extra expert copies per layer ≥ 0")
    rows = loads.tolist() if hasattr(loads, "tolist") else loads
    if not isinstance(rows, list | tuple) or not rows:
        raise UserError("loads: need one list of expert loads per MoE layer (layer × expert)")
    out = []
    for i, row in enumerate(rows):
        row = row.tolist() if hasattr(row, "tolist") else row
        try:
            vals = [float(x) for x in row]
        except (TypeError, ValueError) as exc:
            raise UserError(f"loads: layer {i} is not a list of numbers ({exc})") from exc
        if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
            raise UserError(f"loads: layer {i} needs one finite load ≥ 0 per expert, got {vals}")
        if len(vals) + replicas < devices:
            raise UserError(f"devices {devices}: layer {i} has only {len(vals)} experts + {replicas} replicas; use "
                            f"at most {len(vals) + replicas} devices or more replicas")
        if replicas > len(vals) * (devices - 1):
            raise UserError(f"replicas {replicas}: layer {i} can hold at most {len(vals) * (devices - 1)} extra "
                            f"copies ({len(vals)} experts, one copy per device each); use fewer replicas")
        out.append(vals)
    return out


def round_robin(loads: Any, devices: int) -> Placement:
    """Baseline: expert e on device e mod `devices`, one copy each."""
    rows = _check(loads, devices, 0)
    layers = []
    for row in rows:
        dev_load = [0.0] * devices
        for e, x in enumerate(row):
            dev_load[e % devices] += x
        layers.append(LayerPlacement([[e % devices] for e in range(len(row))], dev_load))
    return Placement("round_robin", devices, 0, layers)


def place_experts(loads: Any, devices: int, replicas: int = 0, swaps: bool = True) -> Placement:
    """Balanced placement per layer: replicate hot experts, LPT-pack copies in equal slots, improve by swaps."""
    rows = _check(loads, devices, replicas)
    return Placement("balanced", devices, replicas, [_place_layer(row, devices, replicas, swaps) for row in rows])


def replica_counts(row: list[float], devices: int, replicas: int) -> list[int]:
    """Copies per expert: each extra copy goes to the expert with the highest load per copy (≤ devices copies)."""
    copies = [1] * len(row)
    for _ in range(replicas):
        e = max((e for e in range(len(row)) if copies[e] < devices), key=lambda e: (row[e] / copies[e], -e))
        copies[e] += 1
    return copies


def _place_layer(row: list[float], n: int, replicas: int, swaps: bool, candidates: int = 8) -> LayerPlacement:
    """Replicas one at a time: each goes to whichever of the `candidates` experts with the highest load per copy
    packs best (uneven slots can make the hottest expert's replica the wrong one)."""
    copies = [1] * len(row)
    best = _pack(row, copies, n, swaps)
    for _ in range(replicas):
        hot = sorted((e for e in range(len(row)) if copies[e] < n), key=lambda e: (-row[e] / copies[e], e))
        trials = []
        for e in hot[:candidates]:
            trial = copies.copy()
            trial[e] += 1
            trials.append((_pack(row, trial, n, swaps), trial))
        best, copies = min(trials, key=lambda t: (t[0].max_load, sum(x * x for x in t[0].device_load)))
    return best


def _pack(row: list[float], copies: list[int], n: int, swaps: bool) -> LayerPlacement:
    """LPT packing of the copies (a copy carries its expert's load / copies) into equal slots, then swaps."""
    items = sorted(((row[e] / copies[e], e) for e in range(len(row)) for _ in range(copies[e])),
                   key=lambda it: (-it[0], it[1]))
    base, extra = divmod(len(items), n)
    held: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    load = [0.0] * n

    def has_room(d: int) -> bool:
        if len(held[d]) < base:
            return True
        return len(held[d]) == base and sum(len(h) > base for h in held) < extra

    for x, e in items:
        free = [d for d in range(n) if has_room(d)]
        ok = [d for d in free if all(f != e for _, f in held[d])] or free
        d = min(ok, key=lambda d: (load[d], d))
        held[d].append((x, e))
        load[d] += x
    if swaps:
        _improve(held, load, base)
    experts: list[list[int]] = [[] for _ in row]
    for d, h in enumerate(held):
        for _, e in h:
            experts[e].append(d)
    return LayerPlacement([sorted(devs) for devs in experts], [sum(x for x, _ in h) for h in held])


def _improve(held: list[list[tuple[float, int]]], load: list[float], base: int, rounds: int = 1000) -> None:
    """Swap a copy of the busiest device with one of another device, or move one to a device with a slot less, while
    that lowers the pair's maximum (slot counts per device stay within the equal-slots rule)."""
    for _ in range(rounds):
        hi = max(range(len(load)), key=lambda d: (load[d], -d))
        best = None
        for d in range(len(load)):
            if d == hi:
                continue
            for i, (a, ea) in enumerate(held[hi]):
                if any(e == ea for _, e in held[d]):
                    continue
                if len(held[hi]) == base + 1 and len(held[d]) == base:
                    peak = max(load[hi] - a, load[d] + a)
                    if peak < load[hi] - 1e-12 and (best is None or peak < best[0]):
                        best = (peak, d, i, None)
                for j, (b, eb) in enumerate(held[d]):
                    if a <= b or any(e == eb for _, e in held[hi]):
                        continue
                    peak = max(load[hi] - a + b, load[d] + a - b)
                    if peak < load[hi] - 1e-12 and (best is None or peak < best[0]):
                        best = (peak, d, i, j)
        if best is None:
            return
        _, d, i, j = best
        a, ea = held[hi].pop(i)
        held[d].append((a, ea))
        load[hi] -= a
        load[d] += a
        if j is not None:
            b, eb = held[d].pop(j)
            held[hi].append((b, eb))
            load[hi] += b
            load[d] -= b
