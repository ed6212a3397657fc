"""Whether a job's resources fit a cluster: the one fitting rule that `train`, `tune` and the autoscaler wait share.

A job is a list of bundles (a Train run: one per worker; a sweep trial: its driver's plus its workers'), and a
bundle must fit on one node: two nodes of 1 CPU each cannot hold a 2-CPU worker, although the cluster has 2 CPUs.
So fitting is a packing of bundles onto nodes by shape (`pack`), never a comparison of totals.
"""
from __future__ import annotations

Bundle = dict[str, float]
EPS = 1e-6  # Ray counts resources in units of 1e-4


def describe(bundles: list[Bundle]) -> str:
    """Bundles as people read them: `2 x (1 CPU, 1 GPU) + 1 x (0.01 CPU)`."""
    groups: dict[tuple, int] = {}
    for b in bundles:
        key = tuple(sorted((k, v) for k, v in b.items() if v))
        groups[key] = groups.get(key, 0) + 1
    return " + ".join(f"{n} x ({', '.join(f'{v:g} {k}' for k, v in key)})" for key, n in groups.items())


def totals(bundles: list[Bundle]) -> Bundle:
    out: Bundle = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0.0) + v
    return out


def node_resources() -> list[Bundle]:
    """The total resources of each live node of the cluster this process joined (what fits on it when idle)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def pack(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """Whether every bundle fits on some node, largest first, each node holding several (Ray's PACK, by shape
    only: what is in use now is not counted, as a placement group just waits for it)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0), sum(b.values())), reverse=True):
        for node in free:
            if all(node.get(k, 0.0) + EPS >= v for k, v in b.items()):
                for k, v in b.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def how_many(unit: list[Bundle], nodes: list[Bundle], limit: int) -> int:
    """The most copies of `unit` (a sweep trial's bundles), up to `limit`, that the nodes hold at once."""
    count = 0
    while count < limit and pack(unit * (count + 1), nodes):
        count += 1
    return count


def fits_now(bundles: list[Bundle]) -> bool:
    return pack(bundles, node_resources())


def holdings(nodes: list[Bundle], keys: list[str]) -> str:
    """What the nodes hold of `keys`, and on how many nodes: `2 CPU, 0 GPU on 2 node(s)`."""
    workers = [n for n in nodes if any(n.get(k, 0) > 0 for k in keys)]
    have = totals(nodes)
    return f"{', '.join(f'{have.get(k, 0.0):g} {k}' for k in keys)} on {len(workers)} node(s)"


def keys_of(bundles: list[Bundle]) -> list[str]:
    """The resources `bundles` ask for, CPU first."""
    return sorted(totals(bundles), key=lambda k: (k != "CPU", k))


def cannot_hold(bundles: list[Bundle], what: str, nodes: list[Bundle]) -> str:
    """The one line for bundles that a cluster which cannot grow does not fit: what they need, what its nodes hold
    (totals can suffice while no single node is big enough: then the largest node is named)."""
    keys = keys_of(bundles)
    need, have = totals(bundles), totals(nodes)
    short = [f"{need[k]:g} {k} in all but the cluster has {have.get(k, 0.0):g}" for k in keys
             if need[k] > have.get(k, 0.0) + EPS]
    if short:
        why = "; ".join(short)
    else:
        largest = max(nodes, key=lambda n: tuple(n.get(k, 0.0) for k in reversed(keys)), default={})
        why = (f"no node is large enough for one bundle (the largest holds "
               f"{', '.join(f'{largest.get(k, 0.0):g} {k}' for k in keys)})")
    return f"{what} needs {describe(bundles)}: {why} ({holdings(nodes, keys)})"
