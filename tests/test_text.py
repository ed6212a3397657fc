"""Text requests without Ray (seconds): `Generator.write`, the Renderer's text jobs (byte-identical however they are
batched), the request schema's refusals through the plain FastAPI app, and `gan-ray sample --text`.

The same API over real HTTP to a real Serve deployment is in tests/test_serve.py; the page in tests/test_page.py."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_ray.core.errors import UserError
from tests.conftest import own_lines, run_cli
from tests.test_serve_inputs import make_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A conditional and an unconditional model (the MLP at seeded initial weights, 8x8 images), exported."""
    from gan_ray.core.model_dir import export

    root = tmp_path_factory.mktemp("text-models")
    return {"conditional": export(make_checkpoint(root, seed=0), root / "cond"),
            "unconditional": export(make_checkpoint(root, seed=1, conditional=False), root / "uncond")}


@pytest.fixture(scope="module")
def gen(models):
    from gan_ray.core.model_dir import load_generator

    return load_generator(models["conditional"])


@pytest.fixture(scope="module")
def client(models):
    from fastapi.testclient import TestClient

    from gan_ray.serve.http import plain_app

    return TestClient(plain_app(models["conditional"]), raise_server_exceptions=False)


def npz(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def png_array(content: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(content)))


# ------------------------------------------------------------------------------------------------ Generator.write
def test_write_lines_one_latent_per_writer(gen):
    """Shapes and labels; a space is a blank cell; each writer's latent is that of image i of `generate` with the
    same seed, used for every character of the line (so a digit repeated in a line is the same drawing)."""
    images, labels, text = gen.write("20 26", 3, seed=7)
    assert text == "20 26"
    assert images.shape == (3, 5, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [[2, 0, -1, 2, 6]] * 3
    assert torch.all(images[:, 2] == 0) and images.min() >= 0 and images.max() <= 1
    twos = gen.generate(3, labels=2, seed=7)
    torch.testing.assert_close(images[:, 0], twos, atol=1e-6, rtol=0)
    torch.testing.assert_close(images[:, 3], twos, atol=1e-6, rtol=0)
    assert not torch.allclose(images[0, 0], images[1, 0])  # writers differ
    assert torch.equal(gen.write("20 26", 3, seed=7).images, images)  # same seed, same images
    assert not torch.equal(gen.write("20 26", 3, seed=8).images, images)


@pytest.mark.parametrize("text,n,mentions", [
    ("", 1, "non-empty"), ("12a", 1, "only digits"), ("   ", 1, "only spaces"), ("1" * 65, 1, "at most 64"),
    ("12", 0, "1..64"), ("12", 65, "1..64"), (12, 1, "string")])
def test_write_refuses_bad_text_and_writer_counts(gen, text, n, mentions):
    with pytest.raises(UserError, match=mentions):
        gen.write(text, n, seed=0)


def test_write_needs_a_conditional_model(models):
    from gan_ray.core.model_dir import load_generator

    with pytest.raises(UserError, match="unconditional"):
        load_generator(models["unconditional"]).write("2026", 2)


# ------------------------------------------------------------------------------------------------------ Renderer
def text_job(renderer, fmt: str, text: str = "2026", n: int = 4, seed: int = 3):
    from gan_ray.serve.schema import GenerateRequest

    return renderer.job(GenerateRequest(text=text, n=n, seed=seed, format=fmt))


@pytest.mark.parametrize("merge", [True, False], ids=["one forward per batch", "one forward per request"])
def test_text_jobs_render_the_same_bytes_however_batched(gen, merge):
    """A text job alone, and packed into one forward between single-image jobs and another text job, gives the
    same bytes in every format (the property the served API promises)."""
    from gan_ray.serve.render import Renderer
    from gan_ray.serve.schema import GenerateRequest

    renderer = Renderer(gen, merge_forwards=merge)
    assert renderer.batch_invariant()  # the MLP on one CPU thread: packed forwards are bit-identical
    for fmt in ("png", "npz", "json"):
        alone = renderer.render([text_job(renderer, fmt, "20 26 1", 5, 11)])[0].body
        others = [renderer.job(GenerateRequest(n=n, seed=n, format="npz")) for n in (1, 17, 3)]
        batch = [others[0], text_job(renderer, "npz", "9 9", 7, 2), text_job(renderer, fmt, "20 26 1", 5, 11),
                 *others[1:]]
        assert renderer.render(batch)[2].body == alone, fmt


def test_text_formats(gen):
    """npz: the arrays Generator.write returns and the text; json: the same nested per writer; png: a row per
    writer, a column per character."""
    from gan_ray.serve.render import Renderer

    renderer = Renderer(gen)
    written = gen.write("2026", 4, seed=3)
    rendered = renderer.render([text_job(renderer, "npz")])[0]
    arrays = npz(rendered.body)
    assert rendered.media_type == "application/x-npz" and rendered.headers["X-Seed"] == "3"
    assert rendered.headers["X-Labels"] == ",".join(["2,0,2,6"] * 4)
    assert arrays["images"].shape == (4, 4, 1, 8, 8) and arrays["images"].dtype == np.float32
    assert arrays["labels"].tolist() == [[2, 0, 2, 6]] * 4 and arrays["labels"].dtype == np.int64
    assert arrays["text"].shape == () and str(arrays["text"]) == "2026"
    np.testing.assert_allclose(arrays["images"], written.images.numpy(), atol=1e-5)

    body = json.loads(renderer.render([text_job(renderer, "json")])[0].body)
    assert {k: body[k] for k in ("n", "seed", "text", "image_shape")} == \
        {"n": 4, "seed": 3, "text": "2026", "image_shape": [1, 8, 8]}
    assert body["labels"] == [[2, 0, 2, 6]] * 4
    tiles = np.array([[png_array(base64.b64decode(s)) for s in line] for line in body["images"]])
    np.testing.assert_array_equal(tiles, np.round(arrays["images"][:, :, 0] * 255).astype(np.uint8))

    grid = png_array(renderer.render([text_job(renderer, "png")])[0].body)
    assert grid.shape == (2 * (4 * 10 + 2), 2 * (4 * 10 + 2))  # 4 writers x 4 characters of 8 px + 2 px borders
    spaced = png_array(renderer.render([text_job(renderer, "png", "2 6", 2)])[0].body)
    assert spaced.shape == (2 * (2 * 10 + 2), 2 * (3 * 10 + 2))
    assert not spaced[:, 2 * 12:2 * 20].any()  # the space's column is blank


# ------------------------------------------------------------------------------------------ the API, no Ray
BAD_TEXT = [
    ("letters", {"text": "20a6"}, 422, "text"),
    ("empty", {"text": ""}, 422, "text"),
    ("only spaces", {"text": "   "}, 422, "text"),
    ("65 characters", {"text": "1" * 65}, 422, "text"),
    ("a number", {"text": 2026}, 422, "text"),
    ("a list", {"text": ["2", "0"]}, 422, "text"),
    ("with labels", {"text": "12", "labels": 1}, 422, "labels"),
    ("65 writers", {"text": "12", "n": 65}, 422, "writers"),
    ("over the cap", {"text": "1" * 64, "n": 17}, 413, "1024"),
]


@pytest.mark.parametrize("case,body,status,mentions", BAD_TEXT, ids=[b[0] for b in BAD_TEXT])
def test_bad_text_requests(client, case, body, status, mentions):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert mentions in json.dumps(r.json()["detail"])


def test_text_at_the_cap_is_served(client):
    r = client.post("/v1/generate", json={"text": "1" * 64, "n": 16, "seed": 0, "format": "npz"})
    assert r.status_code == 200 and npz(r.content)["images"].shape == (16, 64, 1, 8, 8)


def test_text_on_an_unconditional_model_says_why(models):
    from fastapi.testclient import TestClient

    from gan_ray.serve.http import plain_app

    r = TestClient(plain_app(models["unconditional"])).post("/v1/generate", json={"text": "2026"})
    assert r.status_code == 422 and "unconditional" in r.json()["detail"]


def test_openapi_documents_the_text_field(client):
    schema = client.get("/openapi.json").json()
    text = schema["components"]["schemas"]["GenerateRequest"]["properties"]["text"]
    string = next(v for v in text["anyOf"] if v.get("type") == "string")
    assert (string["minLength"], string["maxLength"], string["pattern"]) == (1, 64, "^[0-9 ]*[0-9][0-9 ]*$")


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_sample_text(models, tmp_path):
    from gan_ray.core.model_dir import load_generator

    out = tmp_path / "year.npz"
    r = run_cli("sample", "--model", str(models["conditional"]), "--text", "2026", "--n", "3", "--seed", "5",
                "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    arrays = npz(out.read_bytes())
    written = load_generator(models["conditional"]).write("2026", 3, seed=5)
    np.testing.assert_array_equal(arrays["images"], written.images.numpy())
    assert arrays["labels"].tolist() == [[2, 0, 2, 6]] * 3 and str(arrays["text"]) == "2026"


def test_cli_sample_text_png_and_refusals(models, tmp_path, capsys):
    """In-process (the exit code and the one line of stderr are what `main` returns and prints)."""
    from gan_ray.cli import main

    png = tmp_path / "year.png"
    assert main(["sample", "--model", str(models["conditional"]), "--text", "20 26", "--n", "2", "--out",
                 str(png)]) == 0
    assert png_array(png.read_bytes()).shape == (2 * (2 * 10 + 2), 2 * (5 * 10 + 2))
    capsys.readouterr()
    for args, mentions in [(["--text", "2O26"], "only digits"), (["--text", "12", "--labels", "1"], "not both"),
                           (["--text", "12", "--n", "65"], "1..64"), (["--text", ""], "non-empty")]:
        out = tmp_path / "refused.png"
        code = main(["sample", "--model", str(models["conditional"]), *args, "--out", str(out)])
        err = own_lines(capsys.readouterr().err)  # Ray's forwarded worker lines (other tests') are not the command's
        assert code == 2 and len(err) == 1 and mentions in err[0], err
        assert not out.exists()
    assert main(["sample", "--model", str(models["unconditional"]), "--text", "12", "--out", str(png)]) == 2
    assert "unconditional" in capsys.readouterr().err
