"""Sparsity schedules for iterative pruning: the sparsity to reach after each of `steps`.

    sparsity_schedule(0.8, 4, "cubic")   -> [0.4625, 0.7, 0.7875, 0.8]
    cubic (Zhu & Gupta 2017):  s_k = s_f + (s_i - s_f) (1 - k/n)^3, fast first, gentle last
    linear:                    s_k = s_i + (s_f - s_i) k/n
    geometric (IMP, Frankle & Carbin 2019): the same fraction of the survivors each step,
                               1 - s_k = (1 - s_i) ((1 - s_f) / (1 - s_i))^(k/n)
"""

from __future__ import annotations

from graphc.errors import PassError

SCHEDULES = {
    "cubic": lambda si, sf, t: sf + (si - sf) * (1 - t) ** 3,
    "linear": lambda si, sf, t: si + (sf - si) * t,
    "geometric": lambda si, sf, t: 1 - (1 - si) * ((1 - sf) / (1 - si)) ** t,
}


def sparsity_schedule(target: float, steps: int, schedule: str = "cubic",
                      initial: float = 0.0) -> list[float]:
    """The sparsity after each of `steps` steps, from `initial` to `target` (the last)."""
    if schedule not in SCHEDULES:
        raise PassError(f"prune: schedule={schedule!r} is unknown; choose from "
                        f"{list(SCHEDULES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PassError(f"prune: steps={steps!r} must be an int >= 1")
    for name, v in (("target_sparsity", target), ("initial sparsity", initial)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise PassError(f"prune: {name}={v!r} must be a fraction of zeros in [0, 1)")
    if target < initial:
        raise PassError(f"prune: target_sparsity={target} is below the graph's current "
                        f"sparsity {initial:.4f}; masks only grow")
    fn = SCHEDULES[schedule]
    return [float(fn(initial, target, k / steps)) for k in range(1, steps)] + [float(target)]
