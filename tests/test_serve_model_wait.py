"""The served app starts without its model and serves once it appears (issue 16): a RayService deployed before the
sweep that exports its model has finished must not end DEPLOY_FAILED for good.

Real Serve on the session cluster, real HTTP, a real `export` into the directory the app was given.
"""
from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import run_cli, start_serve, wait_for

pytestmark = pytest.mark.slow


def deploy_waiting(name: str, model_dir, **options) -> str:
    """Deploy exactly as `serve run gan_ray.serve:app model=DIR` would (Ray's own builder call), and return the base
    URL once the app answers /healthz, ready or not (503 with the app's own reason)."""
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from gan_ray.serve.client import wait_ready
    from gan_ray.serve.deployment import http_url

    builder = import_attr("gan_ray.serve:app")
    app = call_user_app_builder_with_args_if_necessary(builder, {"model": str(model_dir), **options})
    serve.run(app, name=name, route_prefix=f"/{name}")
    url = f"{http_url()}/{name}"
    wait_ready(url, timeout_s=120, ready=(200, 503))
    return url


def not_ready_detail(resp: requests.Response) -> str:
    assert resp.status_code == 503, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json")
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("model not loaded: "), detail
    return detail


def test_app_deployed_before_its_model_serves_once_it_is_exported(ray_cluster, serve_models, tmp_path):
    from ray import serve

    from gan_ray.core.model_dir import export

    start_serve(ray_cluster)
    target = tmp_path / "models" / "digits"  # the path the sweep will export to; nothing there yet
    url = deploy_waiting("t-wait", target, min_replicas=1, max_replicas=1, cpus_per_replica=0.5)
    try:
        # Up, but not ready: every endpoint that needs the model says why, as JSON.
        detail = not_ready_detail(requests.get(url + "/healthz", timeout=10))
        assert f"model directory not found: {target}" in detail
        gen = requests.post(url + "/v1/generate", json={"n": 4, "seed": 1}, timeout=10)
        assert not_ready_detail(gen) == detail and gen.headers.get("retry-after")
        not_ready_detail(requests.get(url + "/v1/model", timeout=10))
        assert requests.get(url + "/docs", timeout=10).status_code == 200  # the API itself is up
        status = serve.status().applications["t-wait"].status
        assert status == "RUNNING", status  # not DEPLOY_FAILED: nothing for Serve to give up on

        # A half-written model (a copy in progress, a wrong file): still 503, now saying it is malformed.
        target.mkdir(parents=True)
        (target / "model.json").write_text('{"format": "gan-ray-model/1", "arch"')
        (target / "generator.safetensors").write_bytes(b"not weights")
        wait_for(lambda: "is malformed" in requests.get(url + "/healthz", timeout=10).json()["detail"], 60,
                 "the replica to notice the malformed model")

        # The real export (swapped in by rename, as the sweep job does): ready and serving.
        checkpoint = serve_models["conditional"].parent / "ckpt-conditional"
        export(checkpoint, target)
        t0 = time.monotonic()
        wait_for(lambda: requests.get(url + "/healthz", timeout=10).status_code == 200, 60,
                 "the app to load the exported model")
        print(f"\nready {time.monotonic() - t0:.1f} s after the export")
        assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
        resp = requests.post(url + "/v1/generate", json={"n": 4, "seed": 1, "labels": 7}, timeout=60)
        assert resp.status_code == 200 and resp.content.startswith(b"\x89PNG")
        assert requests.get(url + "/v1/model", timeout=10).json()["format"] == "gan-ray-model/1"
    finally:
        serve.delete("t-wait")


def test_start_serving_returns_while_the_app_waits_for_its_model(ray_cluster, tmp_path):
    """What `gan-ray serve --wait-for-model` calls: the app is up (URL returned) and says why it does not serve."""
    from gan_ray.serve.deployment import start_serving, stop_serving

    start_serve(ray_cluster)
    url = start_serving(tmp_path / "later", name="t-later", route_prefix="/t-later", wait_for_model=True,
                        min_replicas=1, max_replicas=1, cpus_per_replica=0.5, wait_s=120)
    try:
        assert f"model directory not found: {tmp_path / 'later'}" in not_ready_detail(
            requests.get(url + "/healthz", timeout=10))
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
