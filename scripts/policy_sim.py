"""Eviction policies replayed on routing traces: hit rates, against the optimum (no model, no disk).

    python3 scripts/policy_sim.py --tokens 170 --warm 20

Each MoE layer's bank is glm_mlx.offload.Slots, the bookkeeping the offloaded model runs, fed a trace
of scripts/offload_bench.py (GLM-4.5-Air's 128 experts, 8 a token, per layer): uniform, skewed (Zipf
popularity, most of the last token's experts kept), or drifting (skewed, its popular experts drawn anew
every offload_bench.DRIFT tokens). The optimum is Belady's: on a miss, evict the expert not needed now
whose next use is farthest (it knows the future; no policy can beat it). Hits are counted after `--warm`
tokens, over all layers.
"""

from __future__ import annotations

import argparse

import numpy as np

import glm_mlx.offload as offload
from glm_mlx.offload import Slots
from offload_bench import trace

POLICIES = {"lru": ("lru", False), "lfu": ("lfu", False), "lfu+pin": ("lfu", True)}


def hit_rate(tr: np.ndarray, slots: int, E: int, policy: str, pin: bool, warm: int) -> float:
    """A step as the offloaded bank takes it (OffloadedExperts._resident): scores, then misses admitted."""
    hits = misses = 0
    for layer in range(tr.shape[1]):
        table = Slots(slots, E, policy, pin)
        for t in range(tr.shape[0]):
            needed = np.unique(tr[t, layer])
            table.use(needed)
            missed = len(table.admit(needed))
            table.remember(needed)
            if t >= warm:
                hits, misses = hits + len(needed) - missed, misses + missed
    return hits / (hits + misses)


def optimum(tr: np.ndarray, slots: int, E: int, warm: int) -> float:
    """Belady's hit rate: each miss evicts, of the experts not needed now, the one used again last."""
    T = tr.shape[0]
    hits = misses = 0
    for layer in range(tr.shape[1]):
        used = np.zeros((T + 1, E), dtype=bool)
        used[np.arange(T)[:, None], tr[:, layer]] = True
        nxt = np.full((T + 1, E), T + 1)  # nxt[t, e]: the first step >= t that needs e
        for t in range(T - 1, -1, -1):
            nxt[t] = np.where(used[t], t, nxt[t + 1])
        bank: set[int] = set()
        for t in range(T):
            needed = set(tr[t, layer].tolist())
            missed = needed - bank
            for e in missed:
                if len(bank) >= slots:
                    bank.remove(max(bank - needed, key=lambda x: nxt[t + 1, x]))
                bank.add(e)
            if t >= warm:
                hits, misses = hits + len(needed) - len(missed), misses + len(missed)
    return hits / (hits + misses)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=170)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budgets", default="0.5,0.25,0.1")
    ap.add_argument("--traces", default="skewed,drifting,uniform")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--decay", type=float, default=None, help="LFU's aging per step (default offload.DECAY)")
    a = ap.parse_args()
    if a.decay is not None:
        offload.DECAY = a.decay
    E, k = 128, 8
    print(f"hit rates after {a.warm} tokens of warm-up, {a.tokens - a.warm} tokens, {a.layers} layers, "
          f"{E} experts, {k} a token; LFU's aging {offload.DECAY} a step")
    print("| routing | budget | slots | " + " | ".join(POLICIES) + " | optimum |")
    print("|---|---:|---:|" + "---:|" * (len(POLICIES) + 1))
    for kind in a.traces.split(","):
        tr = trace(kind, a.tokens, a.layers, E, k, a.seed)
        for frac in (float(f) for f in a.budgets.split(",")):
            slots = max(k, int(E * frac))
            rates = [hit_rate(tr, slots, E, *POLICIES[p], a.warm) for p in POLICIES]
            print(f"| {kind} | {frac:.0%} | {slots} | " + " | ".join(f"{r:.1%}" for r in rates)
                  + f" | {optimum(tr, slots, E, a.warm):.1%} |", flush=True)


if __name__ == "__main__":
    main()
