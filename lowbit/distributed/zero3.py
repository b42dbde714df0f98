"""DeepSpeed ZeRO-3 keeps each rank's slice of a parameter; code that reads a weight outside
its module's forward (the chunked loss reads lm_head.weight, saving reads the adapters)
must gather it first, on every rank at once."""
from __future__ import annotations

import contextlib


def is_partitioned(p) -> bool:
    return hasattr(p, "ds_id")  # set by deepspeed.zero.Init / ZeRO-3 engine on the params it manages


def zero3_gathered(params):
    """Context in which `params` are whole on every rank (a no-op without ZeRO-3)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
