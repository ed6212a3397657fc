"""Ray Serve application (issue 5): every endpoint and format over real HTTP to a real Serve deployment."""
from __future__ import annotations

import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.conftest import cli, deploy, start_serve, wait_for
from gan_ray.cluster.processes import free_port


# ------------------------------------------------------------------------------------------------------ fixtures
pytestmark = pytest.mark.slow


@dataclass
class Served:
    cond: str
    uncond: str
    models: dict[str, Path]


@pytest.fixture(scope="module")
def served(ray_cluster, serve_models) -> Served:
    from ray import serve

    start_serve(ray_cluster)
    common = dict(min_replicas=1, max_replicas=1, cpus_per_replica=0.5, max_batch_size=16)
    s = Served(deploy("t-cond", serve_models["conditional"], **common),
               deploy("t-uncond", serve_models["unconditional"], **common), serve_models)
    yield s
    for name in ("t-cond", "t-uncond"):
        serve.delete(name)


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(url + "/v1/generate", json=body, timeout=60, **kw)


def npz_arrays(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(content), allow_pickle=False) as z:
        return z["images"], z["labels"]


def png_array(content: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(content)))


# ----------------------------------------------------------------------------------------------------- endpoints
def test_healthz_model_and_docs(served):
    assert requests.get(served.cond + "/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(served.cond + "/v1/model", timeout=10).json()
    serving = info.pop("serving")  # this replica's batching so far
    assert info == json.loads((served.models["conditional"] / "model.json").read_text())
    assert info["num_classes"] == 10 and {"batches", "requests", "mean_batch", "replica"} <= set(serving)
    docs = requests.get(served.cond + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(served.cond + "/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/model", "/healthz"} <= set(spec["paths"])


def test_png_default_is_one_grid(served):
    r = post(served.cond, {})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    one = png_array(r.content)
    r16 = post(served.cond, {"n": 16, "labels": 3, "seed": 5})
    grid = png_array(r16.content)
    # 4 x 4 tiles of 28 px with 2 px borders, upscaled 2x (like `gan-ray sample --out x.png`)
    assert grid.shape == (2 * (4 * 30 + 2), 2 * (4 * 30 + 2))
    assert one.shape == (2 * 32, 2 * 32)
    assert r16.headers["x-seed"] == "5" and r16.headers["x-labels"] == ",".join(["3"] * 16)


def test_npz_matches_the_models_own_generate(served):
    """The `gan-ray sample` array format, with the requested labels; the images are the model's own for that
    seed (the server pads to 16-row blocks, so equal to float rounding, and bit-equal to its local renderer)."""
    from gan_ray.core.model_dir import load_generator
    from gan_ray.serve.schema import GenerateRequest
    from gan_ray.serve.render import Renderer

    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 7]
    r = post(served.cond, {"n": 12, "labels": labels, "seed": 11, "format": "npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    images, lab = npz_arrays(r.content)
    assert images.dtype == np.float32 and images.shape == (12, 1, 28, 28)
    assert lab.dtype == np.int64 and lab.tolist() == labels
    gen = load_generator(served.models["conditional"])
    own = gen.generate(12, labels, seed=11).numpy()
    np.testing.assert_allclose(images, own, atol=1e-5)
    torch.set_num_threads(1)
    local = Renderer(gen)
    job = local.job(GenerateRequest(n=12, labels=labels, seed=11, format="npz"))
    assert local.render([job])[0].body == r.content
    other = npz_arrays(post(served.cond, {"n": 12, "labels": 4, "seed": 11, "format": "npz"}).content)[0]
    assert not np.allclose(other, images)  # the label changes the image


def test_json_format_base64_png_per_image(served):
    r = post(served.cond, {"n": 5, "labels": [1, 1, 2, 3, 5], "seed": 2, "format": "json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["n"] == 5 and body["seed"] == 2 and body["labels"] == [1, 1, 2, 3, 5]
    assert body["image_shape"] == [1, 28, 28] and len(body["images"]) == 5
    tiles = np.stack([png_array(base64.b64decode(s)) for s in body["images"]])
    images, _ = npz_arrays(post(served.cond, {"n": 5, "labels": [1, 1, 2, 3, 5], "seed": 2,
                                             "format": "npz"}).content)
    np.testing.assert_array_equal(tiles, np.round(images[:, 0] * 255).astype(np.uint8))


def test_unconditional_model(served):
    r = post(served.uncond, {"n": 3, "seed": 1, "format": "npz"})
    images, labels = npz_arrays(r.content)
    assert images.shape == (3, 1, 28, 28) and labels.tolist() == [-1, -1, -1]
    assert requests.get(served.uncond + "/v1/model", timeout=10).json()["num_classes"] == 0


def test_same_seed_same_bytes_however_requests_are_batched(served):
    """Byte-identical responses for the same parameters, alone or amid concurrent requests of other sizes
    (which the replica merges into one forward)."""
    for fmt in ("png", "npz", "json"):
        ref = {"n": 7, "labels": 2, "seed": 123, "format": fmt}
        alone = post(served.cond, ref).content
        noise = [{"n": n, "seed": n, "format": "npz"} for n in (1, 33, 64, 5, 256, 17)]
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post, served.cond, body) for body in [ref, *noise, ref, *noise, ref]]
            results = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in results)
        copies = [r.content for r, body in zip(results, [ref, *noise, ref, *noise, ref]) if body is ref]
        assert copies == [alone] * 3, fmt
    assert post(served.cond, {"n": 7, "seed": 124, "format": "npz"}).content != \
        post(served.cond, {"n": 7, "seed": 123, "format": "npz"}).content
    unseeded = [post(served.cond, {"n": 2, "format": "npz"}) for _ in range(2)]
    assert unseeded[0].content != unseeded[1].content
    # the seed a server picked reproduces its response
    again = post(served.cond, {"n": 2, "format": "npz", "seed": int(unseeded[0].headers["x-seed"])})
    assert again.content == unseeded[0].content


def test_requests_under_load_are_really_batched(ray_cluster, serve_models):
    """At concurrency 16 against one replica, `@serve.batch` merges requests, counted by Ray Serve itself (its
    `serve_actual_batch_size` histogram, scraped from the node's Prometheus endpoint, not the replica's own
    counters): at least 2 requests per batch on average, never more than max_batch_size, and no more requests in
    batches than the clients sent. The replica's own count (GET /v1/model) agrees with Ray's."""
    from ray import serve

    from gan_ray.bench.serving import load_test

    url = deploy("t-batch", serve_models["conditional"], min_replicas=1, max_replicas=1, cpus_per_replica=0.5,
                 max_batch_size=8)
    app = {"application": "t-batch"}
    try:
        before = requests.get(url + "/v1/model", timeout=10).json()["serving"]
        stats = load_test(url + "/v1/generate", {"n": 4, "seed": 1, "format": "npz"}, concurrency=16,
                          duration_s=3.0, warmup_s=0.5)
        after = requests.get(url + "/v1/model", timeout=10).json()["serving"]
        assert stats["errors"] == 0 and stats["requests"] > 16
        # Ray's counts reach Prometheus every few seconds: wait until its batches cover the replica's own (those
        # that went through Serve's batch queue: a request alone on the replica skips it, and Ray never sees it)
        own_batches = (after["batches"] - after["alone"]) - (before["batches"] - before["alone"])
        wait_for_metric("ray_serve_batches_processed_total", app, 1)
        text = wait_for_metric("ray_serve_actual_batch_size_count", app, 0.8 * own_batches, timeout_s=120)
        in_batches, batches, largest = batch_sizes(text, app)
        print(f"Ray Serve: >= {in_batches:.0f} requests in {batches:.0f} batches (mean >= {in_batches / batches:.2f}, "
              f"largest <= {largest:g}); "
              f"replica: {after['requests'] - before['requests']} in {own_batches}; clients: {stats['requests']} "
              "timed")
        assert in_batches / batches >= 2.0, "requests under load were not merged into batches"
        assert largest <= 8 and after["largest_batch"] <= 8
        assert in_batches <= after["requests"] - before["requests"]  # what Ray batched, the replica received
        assert after["requests"] - before["requests"] >= stats["requests"]  # the timed ones, plus warm-up and tail
        # ... and the replica's requests reach Prometheus too (counted by the replica: HAProxy's log-parsing
        # metrics are off on a local cluster), as does its own batch histogram (gan_ray_batch_size)
        wait_for_metric("ray_serve_num_http_requests_total", {**app, "method": "POST"}, stats["requests"])
        wait_for_metric("ray_gan_ray_batch_size_count", app, 2)
    finally:
        serve.delete("t-batch")


def batch_sizes(text: str, labels: dict[str, str]) -> tuple[float, float, float]:
    """From Ray Serve's `serve_actual_batch_size` histogram buckets: (requests in batches, at least; batches; the
    largest batch, at most). Its exported `_sum` is not the sum of the sizes (Ray records bucket midpoints: a batch
    of 1 adds 0.5), so the sizes are bounded from the cumulative bucket counts: a batch in (2, 4] held at least 3."""
    import re

    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_serve_actual_batch_size_bucket{") and all(f'{k}="{v}"' in line
                                                                           for k, v in labels.items()):
            le = re.search(r'le="([^"]+)"', line).group(1)
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    requests_min, below, lower, largest = 0.0, 0.0, 0.0, 0.0
    for le, cumulative in sorted(buckets.items()):
        if cumulative > below:
            requests_min += (cumulative - below) * (int(lower) + 1)
            largest = le
        below, lower = cumulative, le
    return requests_min, below, largest


def metric_sum(text: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the Prometheus samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_metric(name: str, labels: dict[str, str], at_least: float, timeout_s: float = 60.0) -> str:
    """Scrape the local node's metrics agent until `name{labels}` sums to `at_least` (exported every few s); the
    scrape that showed it."""
    import ray

    url = f"http://127.0.0.1:{ray._private.worker._global_node.metrics_export_port}/metrics"
    seen: list[str] = []

    def reached() -> bool:
        seen[:] = [requests.get(url, timeout=10).text]
        return metric_sum(seen[0], name, labels) >= at_least

    try:
        wait_for(reached, timeout_s, f"{name}{labels} >= {at_least}", poll_s=1.0)
    except AssertionError as e:  # say how far it got: a lagging export and a missing series read differently
        raise AssertionError(f"{e} (last seen: {metric_sum(seen[0], name, labels) if seen else 'no scrape'})")
    return seen[0]


def test_label_accuracy_over_http_equals_the_models_own(served):
    """The metrics module's label accuracy on HTTP-served samples equals that of the model's own `generate` for
    the same seed and labels (and the served labels are the requested ones)."""
    from gan_ray.eval.metrics import score_labels
    from gan_ray.core.model_dir import load_generator

    requested = [i % 10 for i in range(200)]
    images, labels = npz_arrays(post(served.cond, {"n": 200, "labels": requested, "seed": 7,
                                                   "format": "npz"}).content)
    assert labels.tolist() == requested
    gen = load_generator(served.models["conditional"])
    served_acc = score_labels(torch.from_numpy(images), requested)
    own_acc = score_labels(gen.generate(200, requested, seed=7), requested)
    print(f"label accuracy: served {served_acc:.3f}, model's own {own_acc:.3f}")
    assert served_acc == own_acc


# ---------------------------------------------------------------------------------------------- text requests
def test_text_formats_over_http(served):
    """A string written by n writers: png a row per writer, npz [n, L, C, H, W] equal to the model's own
    `write` (1e-5) and byte-equal to the local renderer, json the same nested per writer."""
    from gan_ray.core.model_dir import load_generator
    from gan_ray.serve.render import Renderer
    from gan_ray.serve.schema import GenerateRequest

    body = {"text": "20 26", "n": 10, "seed": 2026}
    r = post(served.cond, body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "2026"
    assert png_array(r.content).shape == (2 * (10 * 30 + 2), 2 * (5 * 30 + 2))
    r = post(served.cond, {**body, "format": "npz"})
    assert r.headers["x-labels"] == ",".join(["2,0,-1,2,6"] * 10)
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        images, labels, text = z["images"], z["labels"], str(z["text"])
    assert images.shape == (10, 5, 1, 28, 28) and images.dtype == np.float32 and text == "20 26"
    assert labels.tolist() == [[2, 0, -1, 2, 6]] * 10 and not images[:, 2].any()
    gen = load_generator(served.models["conditional"])
    np.testing.assert_allclose(images, gen.write("20 26", 10, seed=2026).images.numpy(), atol=1e-5)
    torch.set_num_threads(1)
    local = Renderer(gen)
    assert local.render([local.job(GenerateRequest(**body, format="npz"))])[0].body == r.content
    js = post(served.cond, {**body, "format": "json"}).json()
    assert (js["n"], js["seed"], js["text"], js["image_shape"]) == (10, 2026, "20 26", [1, 28, 28])
    assert js["labels"] == labels.tolist() and [len(line) for line in js["images"]] == [5] * 10
    tiles = np.array([[png_array(base64.b64decode(s)) for s in line] for line in js["images"]])
    np.testing.assert_array_equal(tiles, np.round(images[:, :, 0] * 255).astype(np.uint8))


def test_text_same_bytes_however_requests_are_batched(served):
    """A text request alone, and amid concurrent single-image and other text requests (merged by the replica
    into one forward), gives the same bytes in every format."""
    noise = [{"n": 33, "seed": 1, "format": "npz"}, {"text": "7 7 7", "n": 64, "seed": 2, "format": "npz"},
             {"n": 5, "labels": 3, "seed": 3}, {"text": "0123456789", "n": 12, "format": "json"}, {"n": 256}]
    for fmt in ("png", "npz", "json"):
        ref = {"text": "1 2026", "n": 9, "seed": 77, "format": fmt}
        alone = post(served.cond, ref).content
        bodies = [ref, *noise, ref, *noise, ref]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda b: post(served.cond, b), bodies))
        assert all(r.status_code == 200 for r in results), [r.text[:200] for r in results if r.status_code != 200]
        assert [r.content for r, b in zip(results, bodies) if b is ref] == [alone] * 3, fmt
    assert post(served.cond, {"text": "2026", "seed": 1}).content != post(served.cond, {"text": "2026",
                                                                                        "seed": 2}).content


def test_bad_text_requests_over_http(served):
    """Every refusal of tests/test_text.py through the real ingress and replica: 422 naming the field, 413 over
    the cap; on an unconditional model, 422 saying why."""
    from tests.test_text import BAD_TEXT

    for case, body, status, mentions in BAD_TEXT:
        r = post(served.cond, body)
        assert r.status_code == status and mentions in json.dumps(r.json()["detail"]), (case, r.status_code, r.text)
    r = post(served.uncond, {"text": "2026", "n": 2})
    assert r.status_code == 422 and "unconditional" in r.json()["detail"]


def test_page_is_served(served):
    """GET / (with and without the trailing slash under a route prefix): the try-it page, HTML."""
    for url in (served.cond, served.cond + "/"):
        r = requests.get(url, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), (url, r.status_code)
        assert "v1/generate" in r.text and "<form" in r.text


# ---------------------------------------------------------------------------------------------------- bad input
BAD_BODIES = [
    ("n 0", {"n": 0}, "n"),
    ("n 257", {"n": 257}, "n"),
    ("n string", {"n": "3"}, "n"),
    ("n float", {"n": 2.5}, "n"),
    ("labels too few", {"n": 3, "labels": [1, 2]}, "labels"),
    ("label out of range", {"n": 2, "labels": [1, 10]}, "0..9"),
    ("negative label", {"labels": -1}, "labels"),
    ("label bool", {"labels": True}, "labels"),
    ("labels strings", {"n": 1, "labels": ["7"]}, "labels"),
    ("seed string", {"seed": "1"}, "seed"),
    ("seed negative", {"seed": -5}, "seed"),
    ("seed huge", {"seed": 2**64}, "seed"),
    ("unknown format", {"format": "gif"}, "format"),
    ("unknown field", {"count": 3}, "count"),
    ("not an object", [1, 2, 3], "body"),
]


@pytest.mark.parametrize("case,body,mentions", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_4xx_with_detail(served, case, body, mentions):
    r = post(served.cond, body)
    assert r.status_code == 422, r.text
    assert mentions in json.dumps(r.json()["detail"])


def test_labels_on_unconditional_model(served):
    r = post(served.uncond, {"n": 2, "labels": 1})
    assert r.status_code == 422 and "unconditional" in r.json()["detail"]


def test_malformed_oversized_and_wrong_method(served):
    url = served.cond + "/v1/generate"
    r = requests.post(url, data=b'{"n": 2,', headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    big = json.dumps({"n": 1, "pad": "x" * 100_000}).encode()
    r = requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while streaming
        yield b'{"n": 1, "pad": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = requests.post(url, data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "exceeds" in r.json()["detail"]
    r = requests.get(url, timeout=30)
    assert r.status_code == 405 and "detail" in r.json()
    r = requests.post(url, data=b"n=3", headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert 400 <= r.status_code < 500 and "detail" in r.json()


def test_non_finite_numbers_and_unparseable_bodies_over_http(served):
    """Through the real ingress and replica, the bodies tests/test_serve_inputs.py sends to the app alone: NaN,
    Infinity and 1e400 (read by Python's json as floats, which FastAPI's 422 echoes back) are a 422 whose body is
    still valid JSON, not a 500; invalid UTF-8 and nesting past the recursion limit are 422 `json_invalid` like any
    other malformed JSON, not a bare 400."""
    from tests.test_serve_inputs import NON_FINITE, UNPARSEABLE, strict_json

    url = served.cond + "/v1/generate"
    for body in NON_FINITE:
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert strict_json(r.content)["detail"][0]["loc"][0] == "body"
    for body in UNPARSEABLE.values():
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid", (r.status_code, r.text)


def test_malformed_content_length_over_http(served):
    """A Content-Length that is not a byte count, sent raw (no HTTP library would send it), through the real
    ingress: a 400, never a 5xx or a hang. Which layer answers depends on the ingress (a proxy may refuse the
    request before the app sees it), so the status is what is promised here, not the body's wording."""
    from urllib.parse import urlsplit

    host, port = urlsplit(served.cond).hostname, urlsplit(served.cond).port
    request = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: ten\r\nConnection: close\r\n\r\n{}")
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.sendall(request)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    status = reply.split(b"\r\n", 1)[0]
    assert status.split()[1] == b"400", reply[:500]


def test_schemathesis_fuzz_finds_no_server_error(served):
    """Property-based fuzzing of the OpenAPI schema, valid and invalid inputs: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(served.cond + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = (operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
                    | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        examples = 150 if operation.path.endswith("/generate") else 5

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            nonlocal calls
            response = case.call(base_url=served.cond, timeout=60)
            calls += case.path.endswith("/generate")
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code}")

        run()
    print(f"schemathesis: {calls} calls to /v1/generate")
    assert calls >= 100
    assert not failures, failures[:5]


# ------------------------------------------------------------------------------------------------------ the CLI
def test_cli_generate_client(served, tmp_path):
    out = tmp_path / "sevens.npz"
    r = cli("generate", "--url", served.cond, "--n", "4", "--labels", "7", "--seed", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    images, labels = npz_arrays(out.read_bytes())
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [7] * 4
    assert out.read_bytes() == post(served.cond, {"n": 4, "labels": 7, "seed": 1, "format": "npz"}).content
    png = tmp_path / "grid.png"
    assert cli("generate", "--url", served.cond, "--n", "9", "--labels", "1,2,3,1,2,3,1,2,3", "--out",
                   str(png)).returncode == 0
    assert png_array(png.read_bytes()).shape == (2 * (3 * 30 + 2), 2 * (3 * 30 + 2))
    bad = cli("generate", "--url", served.cond, "--labels", "12", "--out", str(tmp_path / "x.png"))
    assert bad.returncode == 2 and "0..9" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()
    down = cli("generate", "--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "y.png"))
    assert down.returncode == 2 and "cannot reach" in down.stderr


def test_cli_generate_text(served, tmp_path):
    out = tmp_path / "year.npz"
    r = cli("generate", "--url", served.cond, "--text", "2026", "--n", "10", "--seed", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "'2026' written by 10 writers" in r.stdout and "seed 4" in r.stdout
    assert out.read_bytes() == post(served.cond, {"text": "2026", "n": 10, "seed": 4, "format": "npz"}).content
    png = tmp_path / "year.png"
    assert cli("generate", "--url", served.cond, "--text", "2026", "--n", "10", "--out",
                   str(png)).returncode == 0
    assert png_array(png.read_bytes()).shape == (2 * (10 * 30 + 2), 2 * (4 * 30 + 2))
    for args, mentions in [(["--text", "20x6"], "text"), (["--text", "1" * 64, "--n", "17"], "1024"),
                           (["--text", "1", "--labels", "1"], "not both")]:
        bad = cli("generate", "--url", served.cond, *args, "--out", str(tmp_path / "x.png"))
        assert bad.returncode == 2 and mentions in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "x.png").exists()


def test_cli_serve_refuses_missing_or_corrupt_model(tmp_path):
    """Before anything is served (no Ray is started: this fails in about a second)."""
    r = cli("serve", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.json").write_text("{not json")
    (corrupt / "generator.safetensors").write_bytes(b"garbage")
    r = cli("serve", "--model", str(corrupt))
    assert r.returncode == 2 and "malformed" in r.stderr and "Traceback" not in r.stderr


def test_serve_build_writes_a_valid_deploy_config(serve_models, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gan_ray.serve.schema import ServeArgs

    out = tmp_path / "serve.yaml"
    r = cli("serve", "--model", str(serve_models["conditional"]), "--build", "--max-replicas", "3",
                "--target-ongoing", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    (app_cfg,) = config.applications
    assert app_cfg.import_path == "gan_ray.serve:app"
    args = ServeArgs.model_validate(app_cfg.args)
    assert Path(args.model) == serve_models["conditional"].resolve()
    assert (args.max_replicas, args.target_ongoing) == (3, 4.0)
    packaged = Path(__file__).resolve().parents[1] / "gan_ray" / "serve" / "serve_config.yaml"
    (pkg_app,) = ServeDeploySchema.model_validate(yaml.safe_load(packaged.read_text())).applications
    assert pkg_app.import_path == "gan_ray.serve:app" and ServeArgs.model_validate(pkg_app.args).model
    r = cli("serve", "--model", str(serve_models["conditional"]), "--build", "--max-ongoing", "4",
                "--target-ongoing", "8")
    assert r.returncode == 2 and "must exceed" in r.stderr
