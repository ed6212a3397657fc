"""Waiting for an autoscaling cluster to grow to what a job needs (`wait_for_resources`, shared by `train` and
`tune`), and asking its autoscaler whether it ever can.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from gan_ray.cluster.resources import (Bundle, cannot_hold, describe, fits_now, holdings, keys_of, node_resources,
                                       pack, totals)
from gan_ray.core.errors import UserError, one_line

# The clusters gan-ray is deployed on (k8s/*.yaml, cluster/*.yaml) start with no worker nodes and a head that
# schedules nothing: the resources a job needs appear only once the autoscaler has added nodes for it. A driver that
# compared its needs with `ray.cluster_resources()` refused every job there; one that just started Train would wait
# silently and forever for what might never come. So a driver that does not fit now asks the autoscaler whether the
# cluster can ever hold it (refused at once if not), then waits for the nodes with a progress line and a timeout.
#
# How the driver learns what the cluster can become, in Ray 2.60 (read from its source): the GCS has a slot for the
# autoscaler's node types and maximum counts (`ray._private.state.state.get_cluster_config()`, which Train V2 and
# Data consult), but neither of Ray's autoscalers fills it (nothing calls ReportClusterConfig; it is None on a real
# autoscaling cluster). The autoscaler v2 (the default for KubeRay and `ray up` since Ray 2.50) does answer the
# question itself: a cluster resource constraint (`ray.autoscaler.sdk.request_resources`) is scheduled against the
# largest cluster its node types and max_workers allow, ignoring what is in use, and reported back as infeasible if
# it can never fit (`infeasible_cluster_resource_constraints` in the GCS's cluster status). The same request makes
# it launch the nodes at once when they fit, so only requests that are meant to be met are made. The request is
# cluster-wide and replaces any earlier one: a waiting driver repeats it every second (two drivers waiting at once
# take turns), and withdraws it as soon as its wait ends; the job's own placement groups keep the nodes busy from
# then on.
WAIT_ENV = "GAN_RAY_CLUSTER_WAIT_S"
DEFAULT_WAIT_S = 600.0
PROGRESS_EVERY_S = 10.0
VERDICT_TIMEOUT_S = 60.0  # several autoscaler rounds (5 s each by default; 1 s in the tests)
STARTUP_GRACE_S = 30.0  # a v2 autoscaler that has not reported yet (a head that has just started)


def wait_seconds(value: float | None = None) -> float:
    """How long to wait for the cluster: `value` (a flag), else $GAN_RAY_CLUSTER_WAIT_S, else 600 s."""
    if value is not None:
        return float(value)
    text = os.environ.get(WAIT_ENV)
    if text is None:
        return DEFAULT_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or math.isinf(seconds):
        raise UserError(f"{WAIT_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds



class Autoscaler:
    """The cluster's autoscaler (v2), asked and watched through the GCS: can the cluster ever hold these bundles,
    and how far has it got launching nodes for them. `of_this_cluster()` finds the one a driver joined: this v2,
    a `LegacyAutoscaler` (v1), or None."""

    verdicts = True  # it answers "can the cluster ever hold this?" (v1 does not)

    def __init__(self, gcs_address: str):
        from ray._raylet import GcsClient

        self.gcs_address = gcs_address
        self.gcs = GcsClient(gcs_address)

    @classmethod
    def of_this_cluster(cls) -> "Autoscaler | None":
        """The autoscaler of the cluster this driver joined, or None where there is none that can add nodes for a
        request (a fixed cluster: `ray.init()`, `ray start` without a config)."""
        import ray
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        scaler = cls(ray.get_runtime_context().gcs_address)
        try:
            if not is_autoscaler_v2(fetch_from_server=True, gcs_client=scaler.gcs):
                return LegacyAutoscaler.of(scaler.gcs_address)
            deadline = time.monotonic() + STARTUP_GRACE_S
            while scaler.status().autoscaling_state.autoscaler_state_version == 0:  # not reporting (yet)
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.5)
        except Exception:  # an RPC the GCS does not answer: no autoscaler we can talk to
            return None
        return scaler

    def status(self):
        """The GCS's raw cluster status (GetClusterStatusReply): the autoscaler's last report included."""
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(self.gcs.get_cluster_status())
        return reply

    def request(self, bundles: list[Bundle]) -> None:
        """Ask the autoscaler for a cluster that holds `bundles` (replaces any earlier request; [] withdraws)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(b) for b in bundles])

    @contextmanager
    def requesting(self) -> Iterator["Autoscaler"]:
        """Whatever is requested inside is withdrawn at the end, also on an error or Ctrl-C."""
        try:
            yield self
        finally:
            try:
                self.request([])
            except Exception:  # the cluster went away: nothing left to withdraw
                pass

    def can_hold(self, bundles: list[Bundle]) -> bool:
        """The autoscaler's verdict on `bundles` (requested, and so launched for, if they fit): False if no
        cluster its node types and max_workers allow can hold them. An autoscaler that gives no verdict in time
        counts as a yes (the wait's timeout then ends it)."""
        self.request(bundles)
        asked = self.status().cluster_resource_state.cluster_resource_state_version
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.status().autoscaling_state
            if state.last_seen_cluster_resource_state_version > asked:  # a round that saw the request
                return not state.infeasible_cluster_resource_constraints
            time.sleep(0.2)
        return True

    def launching(self) -> tuple[int, str]:
        """Nodes being launched now, and the newest launch failure (the cloud's reason), if any."""
        state = self.status().autoscaling_state
        pending = sum(r.count for r in state.pending_instance_requests) + len(state.pending_instances)
        failures = sorted(state.failed_instance_requests, key=lambda f: f.failed_ts)
        failure = f"{failures[-1].ray_node_type_name}: {one_line(failures[-1].reason, 200)}" if failures else ""
        return pending, failure


# Ray's autoscaler v1 (`ray up` before Ray 2.50, KubeRay's autoscalerOptions.version v1, RAY_enable_autoscaler_v2=0)
# launches nodes for the same request (`request_resources` writes it to the GCS; the v1 monitor reads it every
# round), but it answers no question: what can never fit stays a pending demand, reported in no structured way. So
# on v1 a job waits (same progress line, same timeout) without a verdict. The v1 monitor does publish its state
# every round, as JSON under the GCS key `ray status` reads (DEBUG_AUTOSCALING_STATUS): nodes per type, launches
# pending, failed nodes. On a cluster started without an autoscaling config (`ray start`, `ray.init()`), the same
# monitor runs Ray's read-only provider, which can add nothing and names each node's type after the node
# (`format_readonly_node_type`): that is a fixed cluster.
LEGACY_STALE_S = 60.0  # a status older than this: no v1 monitor running


class LegacyAutoscaler(Autoscaler):
    """Ray's autoscaler v1: asked like v2 (a cluster resource request), watched through its published status;
    it gives no verdict on what it can never hold."""

    verdicts = False

    @classmethod
    def of(cls, gcs_address: str) -> "LegacyAutoscaler | None":
        """The v1 autoscaler of this cluster if one is running with node types it can add, else None."""
        import ray
        from ray.autoscaler._private.util import format_readonly_node_type

        scaler = cls(gcs_address)
        report = scaler.report()
        if report is None:
            return None
        types = {t for group in ("active_nodes", "idle_nodes", "pending_launches") for t in report.get(group) or {}}
        types |= {t for _ip, t, *_ in report.get("pending_nodes") or []}
        readonly = {format_readonly_node_type(n["NodeID"]) for n in ray.nodes()}
        return None if types <= readonly else scaler

    def report(self) -> dict | None:
        """The v1 monitor's last autoscaler report (nodes per type, pending launches, failed nodes), or None if
        no v1 monitor has reported in the last minute."""
        import json

        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS

        raw = self.gcs.internal_kv_get(DEBUG_AUTOSCALING_STATUS.encode(), namespace=None)
        if not raw:
            return None
        status = json.loads(raw)
        if time.time() - status.get("time", 0) > LEGACY_STALE_S:
            return None
        return status.get("autoscaler_report")

    def can_hold(self, bundles: list[Bundle]) -> bool:
        """v1 gives no verdict: asked for, `bundles` count as a yes (the wait's timeout ends a job that never
        fits)."""
        self.request(bundles)
        return True

    def launching(self) -> tuple[int, str]:
        report = self.report() or {}
        pending = sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
        failed = report.get("failed_nodes") or []
        failure = f"{len(failed)} node(s) failed to start ({', '.join(sorted({t for _ip, t in failed}))})" \
            if failed else ""
        return pending, failure


def never_fits(bundles: list[Bundle], what: str) -> str:
    """The one line for bundles the autoscaler says no cluster it can grow to will hold. Its verdict does not
    say why, and asking it about smaller pieces would launch nodes for those that fit (a GPU node kept up for its
    idle timeout, for a job that is refused): a resource that no node has now is named as the likely cause."""
    nodes = node_resources()
    absent = [k for k in totals(bundles) if k != "CPU" and not any(n.get(k, 0.0) > 0 for n in nodes)]
    hint = f"; no node has {' or '.join(absent)} now: does any node type?" if absent else ""
    return (f"{what} needs {describe(bundles)}, more than this cluster can ever hold: no cluster its autoscaler "
            f"can grow to (node types x max_workers) fits it{hint}")


def say(line: str) -> None:
    """A progress line, flushed at once (a job's log is often a pipe, block-buffered)."""
    print(line, flush=True)


def announce(bundles: list[Bundle], what: str, print_fn: Callable[[str], None] = say) -> None:
    """The wait's first line, printed before the autoscaler is asked anything: asking launches the nodes, and its
    verdict takes a round or more, so by the first progress line the cluster may have grown (or be ready). This
    line says what the job found."""
    print_fn(f"[cluster] {what} needs {describe(bundles)}; the cluster has "
             f"{holdings(node_resources(), keys_of(bundles))}: asking its autoscaler")


def wait_for_resources(bundles: list[Bundle], what: str, *, timeout_s: float, hold: list[Bundle] | None = None,
                       scaler: Autoscaler | None = None, checked: bool = False, print_fn: Callable[[str], None] = say) -> None:
    """Return once the cluster's nodes can hold `bundles` (a job's placement group, `what` in messages).

    - Fits now: return at once.
    - No autoscaler (a fixed cluster): refused at once, saying what its nodes lack (`cannot_hold`).
    - An autoscaler: refused at once (one line) if the cluster can never hold them (v2; v1 gives no verdict, so
      there a job that never fits runs into the timeout); else wait, asking it for
      `hold` meanwhile (default `bundles`; a sweep asks for all its concurrent trials but waits for one), with a
      progress line every few seconds and a UserError naming what is still missing after `timeout_s`.
      `checked`: the caller has had the autoscaler's yes already (with `scaler`).
    """
    if fits_now(bundles):
        return
    scaler = scaler or Autoscaler.of_this_cluster()
    if scaler is None:
        raise UserError(cannot_hold(bundles, what, node_resources()))
    keys = keys_of(bundles)
    if not checked:
        announce(bundles, what, print_fn)
    with scaler.requesting():
        if not checked and not scaler.can_hold(bundles):
            raise UserError(never_fits(bundles, what))
        if not scaler.verdicts:
            print_fn(f"[cluster] this cluster's autoscaler (v1) does not say whether it can ever hold {what}: "
                     f"waiting up to {timeout_s:.0f} s for its nodes")
        t0 = time.monotonic()
        last_line, last_print = "", -PROGRESS_EVERY_S
        while True:
            # Asked again every round: the request is cluster-wide, and another driver waiting meanwhile replaces
            # it (or withdraws it when its own wait ends).
            scaler.request(hold or bundles)
            nodes = node_resources()
            waited = time.monotonic() - t0
            if pack(bundles, nodes):
                print_fn(f"[cluster] ready after {waited:.0f} s: {holdings(nodes, keys)}")
                return
            launching, failure = scaler.launching()
            state = f"the cluster has {holdings(nodes, keys)}" + (f", {launching} launching" if launching else "") + \
                    (f"; last launch failure: {failure}" if failure else "")
            if waited >= timeout_s:
                need = totals(bundles)
                have = totals(nodes)
                missing = ", ".join(f"{need[k] - have.get(k, 0.0):g} {k}" for k in keys
                                    if need[k] > have.get(k, 0.0) + 1e-6) or f"room for {describe(bundles)}"
                raise UserError(f"waited {waited:.0f} s for the autoscaler ({WAIT_ENV} or --cluster-wait-s), "
                                f"still missing {missing} for {what}: {state}")
            line = f"[cluster] waiting for the autoscaler: {what} needs {describe(bundles)}; {state}"
            if line != last_line or waited - last_print >= PROGRESS_EVERY_S:
                print_fn(f"{line}; waited {waited:.0f} s of {timeout_s:.0f} s")
                last_line, last_print = line, waited
            time.sleep(1.0)
