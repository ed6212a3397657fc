"""The try-it page at `GET /`: self-contained HTML on the public API (no Ray), and a real headless Chromium driven
by Selenium against a real Serve deployment: load it, fill the form, press Generate, and the image shown is the
API's own answer for the same request, byte for byte.

The browser is Debian's `chromium` with its `chromium-driver` (.ci/run installs both); nothing is downloaded at
run time. Without them the browser test skips with a one-line reason."""
from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile

import pytest
import requests
from tests.conftest import deploy, start_serve
from tests.test_serve import png_array


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# No sandbox (root in CI), no GPU, and nothing that phones home: this machine has no internet, and Chromium's
# background fetches (component updates, sync, QUIC probes) hang on refused connections without these.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1600"]


def test_page_is_self_contained_and_uses_only_the_public_api():
    """No external assets (scripts, styles, images, fonts from elsewhere), and the only endpoints it calls are the
    public ones, by URLs relative to the page (so it works under any route prefix)."""
    from gan_ray.serve.http import page_html

    html = page_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page loads something external"
    assert not re.search(r"<script[^>]+src|<link[^>]+stylesheet|@import|url\(", html)
    calls = set(re.findall(r'base \+ "([^"]+)"', html))
    assert calls == {"v1/model", "v1/generate", "docs"}, calls
    assert "fetch(" in html and "<form" in html


def test_plain_app_serves_the_page(tmp_path):
    from fastapi.testclient import TestClient

    from gan_ray.core.model_dir import export
    from gan_ray.serve.http import page_html, plain_app
    from tests.test_serve_inputs import make_checkpoint

    client = TestClient(plain_app(export(make_checkpoint(tmp_path, seed=0), tmp_path / "model")))
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and r.text == page_html()
    assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not part of the API


# ------------------------------------------------------------------------------------------- in a real browser
@pytest.fixture(scope="module")
def page_url(ray_cluster, serve_models, tmp_path_factory) -> str:
    """The conditional test model served under /t-page, its model.json carrying a quality metric measured on
    its own samples (the exported test model has none: it was never evaluated), for the model card to show."""
    from ray import serve

    from gan_ray.core.model_dir import load_generator
    from gan_ray.eval.metrics import score_labels

    model = tmp_path_factory.mktemp("page") / "model"
    shutil.copytree(serve_models["conditional"], model)
    requested = [i % 10 for i in range(100)]
    accuracy = score_labels(load_generator(model).generate(100, requested, seed=0), requested)
    info = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**info, "metrics": {"label_accuracy": accuracy}}))
    start_serve(ray_cluster)
    url = deploy("t-page", model, min_replicas=1, max_replicas=1, cpus_per_replica=0.5)
    yield url
    serve.delete("t-page")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="gan-ray-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def generated(driver, previous: str | None = None) -> str:
    """Wait for the page to show a new result (or an error) and return the status line."""
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        status = d.find_element("id", "status")
        src = d.find_element("id", "result").get_attribute("src")
        return (status.get_attribute("class") == "error" or (src and src != previous)) and \
            d.find_element("id", "generate").is_enabled()

    WebDriverWait(driver, 60, poll_frequency=0.2).until(done)
    return driver.find_element("id", "status").text


def shown_png(driver) -> bytes:
    """The bytes of the image the page shows (a data: URL of the response body), after checking the browser
    decoded it."""
    img = driver.find_element("id", "result")
    assert img.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", img) > 0
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1])


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),  # a marker, not a fixture's skip: no Ray is started for nothing
                    reason="no headless browser: apt-get install chromium chromium-driver (as .ci/run does)")
def test_page_in_a_real_browser(browser, page_url, serve_models):
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(page_url + "/")
    WebDriverWait(browser, 60, poll_frequency=0.2).until(
        lambda d: d.find_element("id", "card-table").is_displayed())
    info = requests.get(page_url + "/v1/model", timeout=30).json()
    assert browser.find_element("id", "card-dataset").text == info["dataset"] == "digits"
    assert browser.find_element("id", "card-arch").text.startswith("mlp")
    assert browser.find_element("id", "card-conditional").text == "yes, 10 classes"
    metrics = browser.find_element("id", "metrics").text
    assert "label_accuracy" in metrics and f"{info['metrics']['label_accuracy']:.4g}"[:4] in metrics

    # a text, written by ten writers, with a seed: the same bytes as the API's answer to the same request
    fill(browser, "text", "2026")
    fill(browser, "n", "10")
    fill(browser, "seed", "9007199254740993")  # past 2^53: sent exactly, not rounded by JavaScript
    browser.find_element("id", "generate").click()
    status = generated(browser)
    assert "seed 9007199254740993" in status, status
    shown = shown_png(browser)
    api = requests.post(page_url + "/v1/generate", json={"text": "2026", "n": 10, "seed": 9007199254740993},
                        timeout=60)
    assert api.status_code == 200 and shown == api.content
    assert png_array(shown).shape == (2 * (10 * 30 + 2), 2 * (4 * 30 + 2))
    link = browser.find_element("id", "download")
    assert link.is_displayed() and link.get_attribute("href") == browser.find_element("id", "result") \
        .get_attribute("src")
    assert link.get_attribute("download") == "gan-ray-2026-n10-seed9007199254740993.png"

    # a digit: sixteen 7s
    previous = browser.find_element("id", "result").get_attribute("src")
    browser.find_element("id", "mode-digit").click()
    Select(browser.find_element("id", "digit")).select_by_value("7")
    fill(browser, "n", "16")
    fill(browser, "seed", "5")
    browser.find_element("id", "generate").click()
    generated(browser, previous)
    api = requests.post(page_url + "/v1/generate", json={"n": 16, "labels": 7, "seed": 5}, timeout=60)
    assert shown_png(browser) == api.content

    # refused input: the server's detail, naming the field
    browser.find_element("id", "mode-text").click()
    fill(browser, "text", "20x6")
    browser.find_element("id", "generate").click()
    status = generated(browser, browser.find_element("id", "result").get_attribute("src"))
    assert browser.find_element("id", "status").get_attribute("class") == "error"
    assert "422" in status and "text" in status and "only digits" in status, status
