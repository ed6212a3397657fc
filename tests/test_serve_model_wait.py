"""The served app starts without its model, is not ready while it has none, and serves once it appears (issues 16
and 24): a RayService deployed before the sweep that exports its model has finished must neither end DEPLOY_FAILED
for good nor be marked ready (KubeRay reads "every Serve app RUNNING" as ready, and switches a `NewCluster` upgrade's
traffic on it) before its replicas can answer.

Real Serve on the session cluster, real HTTP, a real `export` into the directory the app was given.
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import run_cli, start_serve, wait_for

pytestmark = pytest.mark.slow


def deploy_waiting(name: str, model_dir, **options) -> str:
    """Deploy exactly as `serve run gan_ray.serve:app model=DIR` would (Ray's own builder call), without waiting
    for the app to run, and return its base URL."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from gan_ray.serve.deployment import http_url

    builder = import_attr("gan_ray.serve:app")
    app = call_user_app_builder_with_args_if_necessary(builder, {"model": str(model_dir), **options})
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=f"/{name}")], wait_for_applications_running=False)
    return f"{http_url()}/{name}"


def app_status(name: str) -> tuple[str, str]:
    """(the app's status, its deployment's status) as Serve reports them: what KubeRay reads."""
    from ray import serve

    app = serve.status().applications[name]
    (deployment,) = app.deployments.values()
    return str(app.status.value), str(deployment.status.value)


def stays_deploying(name: str, seconds: float) -> None:
    """Not ready, and not given up on, for `seconds`: a replica that failed to start 3 times would have ended the
    app DEPLOY_FAILED by then; one that answered while it had no model would have made it RUNNING."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert app_status(name) == ("DEPLOYING", "UPDATING"), app_status(name)
        time.sleep(1)


def test_app_deployed_before_its_model_is_not_ready_until_it_is_exported(ray_cluster, serve_models, tmp_path):
    from ray import serve

    from gan_ray.core.model_dir import export

    start_serve(ray_cluster)
    target = tmp_path / "models" / "digits"  # the path the sweep will export to; nothing there yet
    url = deploy_waiting("t-wait", target, min_replicas=1, max_replicas=1, cpus_per_replica=0.5)
    try:
        # Deployed, waiting: no replica answers (a request waits for one), the app is not ready and not failed.
        stays_deploying("t-wait", 20)
        with pytest.raises(requests.Timeout):
            requests.get(url + "/healthz", timeout=3)

        # A half-written model (a copy in progress, a wrong file): still waiting, not failed.
        target.mkdir(parents=True)
        (target / "model.json").write_text('{"format": "gan-ray-model/1", "arch"')
        (target / "generator.safetensors").write_bytes(b"not weights")
        stays_deploying("t-wait", 8)

        # The real export (swapped in by rename, as the sweep job does): RUNNING, and serving at once.
        checkpoint = serve_models["conditional"].parent / "ckpt-conditional"
        export(checkpoint, target)
        t0 = time.monotonic()
        wait_for(lambda: app_status("t-wait")[0] == "RUNNING", 120, "the app to load the exported model")
        print(f"\nRUNNING {time.monotonic() - t0:.1f} s after the export")
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        resp = requests.post(url + "/v1/generate", json={"n": 4, "seed": 1, "labels": 7}, timeout=60)
        assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")
        assert requests.get(url + "/v1/model", timeout=10).json()["format"] == "gan-ray-model/1"
    finally:
        serve.delete("t-wait")


def test_start_serving_returns_while_the_app_waits_for_its_model(ray_cluster, tmp_path):
    """What `gan-ray serve --wait-for-model` calls: the app is deployed (URL returned) and waits, not ready."""
    from gan_ray.serve.deployment import start_serving, stop_serving

    start_serve(ray_cluster)
    start_serving(tmp_path / "later", name="t-later", route_prefix="/t-later", wait_for_model=True,
                  min_replicas=1, max_replicas=1, cpus_per_replica=0.5, wait_s=120)
    try:
        wait_for(lambda: app_status("t-later") == ("DEPLOYING", "UPDATING"), 60, "the app to deploy")
    finally:
        stop_serving("t-later", shutdown_serve=False)


def test_cli_serve_still_refuses_a_missing_model_unless_told_to_wait(tmp_path):
    """`gan-ray serve --model DIR` is a person at a terminal: a typo in DIR is one line at once (no Ray started).
    --wait-for-model is for a model on its way; with --build it writes the config without the model."""
    r = run_cli("serve", "--model", str(tmp_path / "nope"), timeout=60)
    assert r.returncode == 2 and "model directory not found" in r.stderr and "Traceback" not in r.stderr
    out = tmp_path / "serve.yaml"
    r = run_cli("serve", "--model", str(tmp_path / "later"), "--wait-for-model", "--build", "--out", str(out),
                timeout=60)
    assert r.returncode == 0, r.stderr
    assert str(tmp_path / "later") in out.read_text()
