"""What data-parallel replicas agree on, through their ``Accelerator``.

Under ``accelerate launch`` every process runs the same loop on its own share of the data. A
decision that depends on data (continue sampling? was the loss finite? did the checkpoint
write fail? which extrapolation to keep?) must come out the same on every process, or one of
them waits in a collective the others never enter, or the replicas drift apart and DDP never
notices. Each helper here is one collective and returns the same value on every process; with
one process each returns its input unchanged (no collective, no copy).
"""

from __future__ import annotations

import hashlib

import torch


def _reduce(acc, values: list[float], reduction: str) -> list[float]:
    if acc.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction=reduction).tolist()


def sum_across(acc, values: list[float]) -> list[float]:
    """The elementwise sum over processes of ``values`` (float64)."""
    return _reduce(acc, values, "sum")


def max_across(acc, value: float) -> float:
    return _reduce(acc, [value], "max")[0]


def any_replica(acc, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    return bool(max_across(acc, float(bool(flag))))


def gather_list(acc, items: list) -> list:
    """The concatenation, in process order, of every process's ``items`` (picklable objects)."""
    if acc.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def shard(items: list, rank: int, world: int) -> list:
    """Process ``rank``'s contiguous share of ``items``: the first ``len % world`` processes get
    one item more, so concatenating the shards in process order gives ``items`` back."""
    n, extra = divmod(len(items), world)
    start = rank * n + min(rank, extra)
    return items[start : start + n + (rank < extra)]


def padded_shard(accelerator, items: list) -> tuple[list, int]:
    """This process's contiguous share of ``items`` and how many of them are real: every share
    is padded to the same length (repeating an item), so that all processes run the same number
    of forward passes, which sharded (FSDP2) models need; the padding's results are dropped."""
    world = accelerator.num_processes
    mine = shard(items, accelerator.process_index, world)
    size = -(-len(items) // world)
    return mine + [(mine or items)[-1]] * (size - len(mine)), len(mine)


def mean_metrics(acc, metrics: dict, summed: tuple[str, ...] = ()) -> dict:
    """``metrics`` with every number replaced by its mean over processes (its sum for the keys
    in ``summed``). Every process must hold the same numeric keys (the loop guarantees it: all
    run the same method).

    A pair ``K:sum`` and ``K:count`` (a weighted mean: e.g. a per-teacher KL summed over that
    teacher's tokens, and the token count) is summed over processes and becomes ``K`` = sum /
    count, left out where the count is 0."""
    if acc.num_processes == 1:
        return _ratios(dict(metrics))
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    # a process with other keys would pair its numbers with the wrong ones (or wait forever)
    signature = float(int.from_bytes(hashlib.sha256("\n".join(keys).encode()).digest()[:6], "big"))
    if _reduce(acc, [signature, -signature], "max") != [signature, -signature]:  # max and min in one
        raise RuntimeError(f"process {acc.process_index} logs the metrics {keys}, other processes log others; "
                           "every process must log the same keys")
    totals = sum_across(acc, [float(metrics[k]) for k in keys])
    out = dict(metrics)
    for k, total in zip(keys, totals):
        out[k] = total if k in summed or k.endswith((":sum", ":count")) else total / acc.num_processes
    return _ratios(out)


def _ratios(metrics: dict) -> dict:
    for key in [k for k in metrics if k.endswith(":sum")]:
        base, total = key[: -len(":sum")], metrics.pop(key)
        count = metrics.pop(base + ":count", 0)
        if count:
            metrics[base] = total / count
    return metrics
