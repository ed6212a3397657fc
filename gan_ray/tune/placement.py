"""Giving back the CPUs of trials Tune has stopped: the Train placement groups a sweep would otherwise leak.

Ray scopes a placement group to the job, not to the actor that made it. When Tune stops a trial (ASHA's early stop,
PBT's pause) its Train controller dies with it, and the workers' placement group stays reserved until the sweep's
job ends: the next trials (or the training after a sweep, in `gan-ray demo`) then wait forever for CPUs. Train's
own PlacementGroupCleaner covers this only where its state-API lookup works (it fails with several Ray clusters
on one machine). Two mechanisms here:

- each Train run records its worker placement group (`PlacementGroupRecorder`), and the sweep driver removes
  those of every trial that is no longer running (`release_placement_groups`, about once a second);
- a controller that sees its workers die while it is being torn down may start a new worker group before it dies
  itself, whose group is never recorded. `SweepGroups` removes groups of the sweep's job that no running trial
  accounts for once they are older than any legitimate start could take, and every one the sweep made when it ends.
"""
from __future__ import annotations

import time
from pathlib import Path

from ray.train.v2._internal.execution.callback import WorkerGroupCallback  # Train's documented workaround hook

PG_FILE = "placement_groups.txt"  # per Train run: the worker placement groups it created (hex ids)
# Every state but REMOVED holds (or waits for) resources. PREPARED is the middle of the GCS's two-phase commit: a
# group seen there in the "before" snapshot and CREATED a moment later was once mistaken for one of the sweep's own.
LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")
# Train gives up on a worker group that has not started within 60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) and
# removes its group; an unaccounted group older than this is an orphan, not a start in progress.
ORPHAN_AFTER_S = 120.0


class PlacementGroupRecorder(WorkerGroupCallback):
    """Writes the id of each worker placement group a Train run creates into the run directory."""

    def __init__(self, path: str):
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        with open(self.path, "a") as f:
            f.write(pg.id.hex() + "\n")


def run_index(name: str) -> int:
    """train -> 0, train-3 -> 3: the order in which a trial started its Train runs."""
    return int(name.split("-")[1]) if "-" in name else 0


def recorded_runs(trial_dir: Path) -> list[list[str]]:
    """Hex ids recorded under a trial, one list per Train run, oldest run first."""
    files = sorted(trial_dir.glob(f"train*/{PG_FILE}"), key=lambda p: run_index(p.parent.name))
    return [f.read_text().split() for f in files]


def remove_groups(ids: list[str]) -> int:
    """Remove those of `ids` that still hold (or wait for) resources; returns how many were removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for hex_id in ids:
        pg = PlacementGroup(PlacementGroupID.from_hex(hex_id))
        try:
            if placement_group_table(pg).get("state") in LIVE_STATES:
                remove_placement_group(pg)
                removed += 1
        except Exception:  # already gone, or the GCS forgot it: nothing is held
            pass
    return removed


def release_placement_groups(trial_dir: Path, keep_latest_run: bool) -> list[str]:
    """Remove the still-existing worker placement groups recorded under a trial, except those of its newest Train
    run when `keep_latest_run` (a running trial's); returns the ids kept."""
    runs = recorded_runs(trial_dir)
    kept = runs.pop() if keep_latest_run and runs else []
    remove_groups([hex_id for run in runs for hex_id in run])
    return kept


def job_groups(skip_bundles: list[dict] | None = None) -> set[str]:
    """Live placement groups of this driver's job (a group's id ends with its job's id), except those whose
    bundles are exactly `skip_bundles`."""
    import ray
    from ray.util.placement_group import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {hex_id for hex_id, info in placement_group_table().items()
            if hex_id.endswith(job) and info.get("state") in LIVE_STATES
            and (skip_bundles is None or list(info.get("bundles", {}).values()) != skip_bundles)}


class SweepGroups:
    """The placement groups a sweep's job makes while it runs (those that existed before it are not its own).

    `trial_bundles`: the bundles of Tune's own per-trial group (the trial driver's reservation), which Tune
    manages itself and which never count as orphans."""

    def __init__(self, trial_bundles: list[dict]) -> None:
        self.trial_bundles = trial_bundles
        self.before = job_groups()
        self.first_seen: dict[str, float] = {}

    def remove_orphans(self, accounted: set[str], now: float | None = None) -> int:
        """Remove the sweep's worker groups that no running trial accounts for and that have been unaccounted for
        longer than ORPHAN_AFTER_S."""
        now = time.monotonic() if now is None else now
        unaccounted = job_groups(self.trial_bundles) - self.before - accounted
        self.first_seen = {g: self.first_seen.get(g, now) for g in unaccounted}
        return remove_groups([g for g, t in self.first_seen.items() if now - t >= ORPHAN_AFTER_S])

    def remove_all(self) -> int:
        """At the end of the sweep: every group it made that is still held."""
        return remove_groups(sorted(job_groups() - self.before))
