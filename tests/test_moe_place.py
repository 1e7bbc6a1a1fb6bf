"""Expert-parallel placement: balanced packing with replicas against the round-robin baseline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from compress.errors import UserError
from compress.moe.place import place_experts, replica_counts, round_robin


def skewed(layers: int = 4, experts: int = 16, seed: int = 0) -> list[list[float]]:
    """Zipf-like loads, shuffled per layer so the hot experts are not in index order."""
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        row = [1000.0 / (r + 1) ** 1.1 for r in range(experts)]
        rng.shuffle(row)
        out.append(row)
    return out


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_balanced_beats_round_robin(devices):
    loads = skewed()
    ours, rr = place_experts(loads, devices), round_robin(loads, devices)
    for a, b in zip(ours.layers, rr.layers, strict=True):
        assert a.imbalance <= b.imbalance + 1e-9
    assert ours.summary()["max_over_mean_mean"] < rr.summary()["max_over_mean_mean"]


def test_replicas_reduce_max_load():
    loads = [[100.0, 10, 10, 10, 10, 10, 10, 10]]  # one hot expert dominates its device
    one, two = place_experts(loads, 4), place_experts(loads, 4, replicas=2)
    assert one.layers[0].max_load == 110.0  # equal slots: the hot expert shares its device
    assert two.layers[0].max_load < one.layers[0].max_load
    assert replica_counts(loads[0], 4, 2) == [3, 1, 1, 1, 1, 1, 1, 1]
    assert len(set(two.layers[0].experts[0])) == 3  # copies of one expert on distinct devices


@pytest.mark.parametrize("replicas", [0, 3, 6])
def test_invariants(replicas):
    loads = skewed(layers=3, experts=10, seed=1)
    p = place_experts(torch.tensor(loads), 4, replicas=replicas)
    for row, ly in zip(loads, p.layers, strict=True):
        assert all(ly.experts[e] for e in range(len(row)))  # every expert placed
        assert sum(len(d) for d in ly.experts) == len(row) + replicas
        assert all(len(set(d)) == len(d) for d in ly.experts)
        assert sum(ly.device_load) == pytest.approx(sum(row))
        slots = [len(x) for x in ly.device_experts()]
        assert max(slots) - min(slots) <= 1  # equal slots (±1 when they do not divide)
    json.dumps(p.to_dict())


def test_round_robin_layout():
    p = round_robin([[1, 2, 3, 4, 5]], 2)
    assert p.layers[0].experts == [[0], [1], [0], [1], [0]]
    assert p.layers[0].device_load == [9.0, 6.0]


@pytest.mark.parametrize("kwargs,match", [(dict(devices=0), "devices"), (dict(devices=2, replicas=-1), "replicas"),
                                          (dict(devices=9), "at most 8 devices"),
                                          (dict(devices=2, replicas=9), "replicas 9")])
def test_bad_input(kwargs, match):
    with pytest.raises(UserError, match=match):
        place_experts([[1.0] * 8], **kwargs)
