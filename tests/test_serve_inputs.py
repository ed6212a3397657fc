"""Hostile inputs to the serving path, without Ray (seconds): HTTP bodies through the same FastAPI app and error
handlers the Serve deployment uses, model directories (export races, edited model.json), the unseeded latent's
effect on torch's global RNG, and malformed `gan-ray evaluate --samples` files.

The real Serve deployment gets the same HTTP cases in tests/test_serve.py."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gan_ray.core.errors import UserError
from tests.conftest import own_lines, run_cli

SPEC_LATENT = 8


def make_checkpoint(root: Path, *, seed: int, conditional: bool = True) -> Path:
    """A real (untrained) checkpoint written by gan_ray.core.checkpoint: the MLP GAN at its seeded initial weights."""
    from gan_ray.core import checkpoint
    from gan_ray.core.config import TrainConfig
    from gan_ray.core.models import ModelSpec, build
    from gan_ray.core.step import make_state

    torch.manual_seed(seed)
    spec = ModelSpec("mlp", SPEC_LATENT, (1, 8, 8), 10 if conditional else 0)
    G, D = build(spec)
    state = make_state(spec, G, D, lr_g=2e-4, lr_d=2e-4, beta1=0.5)
    cfg = TrainConfig(dataset="digits", arch="mlp", conditional=conditional, latent_dim=SPEC_LATENT, seed=seed)
    return checkpoint.save(root / f"ckpt-{seed}", state, epoch=1, config=cfg.to_dict())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from gan_ray.core.model_dir import export

    root = tmp_path_factory.mktemp("serve-inputs")
    return export(make_checkpoint(root, seed=0), root / "model")


@pytest.fixture(scope="module")
def client(model_dir):
    from fastapi.testclient import TestClient

    from gan_ray.serve.http import plain_app

    return TestClient(plain_app(model_dir), raise_server_exceptions=False)


def strict_json(content: bytes):
    """Parse as standard JSON: NaN/Infinity in a response body are not JSON, whatever Python's json accepts."""
    def refuse(token: str):
        raise AssertionError(f"response holds the non-JSON token {token}")

    return json.loads(content, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------- HTTP bodies
NON_FINITE = [b'{"seed": NaN}', b'{"n": 1e400}', b'{"seed": -1e999}', b'{"labels": [-Infinity]}',
              b'{"n": Infinity}', b'{"format": NaN}', b'{"x": NaN}', b'{"n": 2, "labels": [1, NaN]}']


@pytest.mark.parametrize("body", NON_FINITE, ids=[b.decode() for b in NON_FINITE])
def test_non_finite_numbers_are_422_not_500(client, body):
    """Python's json reads NaN, Infinity and 1e400 as floats; the 422 that echoes them must still serialise."""
    r = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = strict_json(r.content)["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][0] == "body" and detail[0]["msg"]


# A syntax error (`{"n": 2,`) was always 422 json_invalid (tests/test_serve.py); these were FastAPI's bare 400.
UNPARSEABLE = {"invalid utf-8": b'{"n": 1, "x": "\xff"}', "nested too deeply": b"[" * 30_000,
               "nested object too deeply": b'{"a":' * 10_000}


@pytest.mark.parametrize("body", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
def test_every_unparseable_body_is_422_json_invalid(client, body):
    r = client.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["type"] == "json_invalid" and error["loc"][0] == "body" and error["ctx"]["error"]


def test_invalid_utf8_reports_its_position(client):
    r = client.post("/v1/generate", content=b'{"n": 1, "x": "\xff"}', headers={"Content-Type": "application/json"})
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", 15] and "0xff" in error["ctx"]["error"]


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", ""])
def test_malformed_content_length_is_400_not_413(client, value):
    """A header the client got wrong is a 400; 413 stays for bodies that really are too large."""
    r = client.post("/v1/generate", content=b'{"n": 1}',
                    headers={"Content-Type": "application/json", "Content-Length": value})
    assert r.status_code == 400, r.text
    assert "Content-Length" in r.json()["detail"]
    big = client.post("/v1/generate", content=b" " * 70_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "exceeds" in big.json()["detail"]


# -------------------------------------------------------------------------------------------- global RNG state
def test_unseeded_generate_leaves_torch_global_rng_alone(model_dir):
    from gan_ray.core.step import latent_for_seed
    from gan_ray.core.model_dir import load_generator

    gen = load_generator(model_dir)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first, second = gen.generate(4), gen.generate(4)
    assert torch.equal(torch.rand(3), expected)  # the caller's seeded stream went on where it was
    assert not torch.equal(first, second)  # still a fresh random seed per call
    assert not torch.equal(latent_for_seed(2, 4, None), latent_for_seed(2, 4, None))


# ----------------------------------------------------------------------------------------------- model.json
EDITS = {
    "image_shape of two": ({"image_shape": [1, 784]}, "three integers"),
    "image_shape string": ({"image_shape": "128"}, "three integers"),
    "image_shape float": ({"image_shape": [1, 8, 8.5]}, "three integers"),
    "two channels": ({"image_shape": [2, 8, 4]}, "channels"),
    "zero height": ({"image_shape": [1, 0, 8]}, "positive"),
    "arch list": ({"arch": ["mlp"]}, "arch must be a string"),
    "unknown arch": ({"arch": "vit"}, "unknown --arch"),
    "latent float": ({"latent_dim": 8.9}, "latent_dim"),
    "latent bool": ({"latent_dim": True}, "latent_dim"),
    "classes negative": ({"num_classes": -1}, "num_classes"),
    "classes null": ({"num_classes": None}, "num_classes"),
    "future format": ({"format": "gan-ray-model/9"}, "gan-ray-model/9"),
    "no format": ({"format": None}, "format"),
}


@pytest.mark.parametrize("edit,mentions", EDITS.values(), ids=EDITS.keys())
def test_load_generator_refuses_bad_model_json(model_dir, tmp_path, edit, mentions):
    import shutil

    from gan_ray.core.model_dir import MODEL_JSON, load_generator

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    info = json.loads((bad / MODEL_JSON).read_text())
    (bad / MODEL_JSON).write_text(json.dumps({**info, **edit}))
    with pytest.raises(UserError, match="malformed") as caught:
        load_generator(bad)
    message = str(caught.value)
    assert mentions in message and "\n" not in message


def test_load_generator_refuses_a_json_list(model_dir, tmp_path):
    import shutil

    from gan_ray.core.model_dir import MODEL_JSON, load_generator

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    (bad / MODEL_JSON).write_text("[]")
    with pytest.raises(UserError, match="JSON object"):
        load_generator(bad)


# ------------------------------------------------------------------------------------------------------ export
def test_export_to_an_existing_file_is_a_user_error(tmp_path):
    from gan_ray.core.model_dir import export

    target = tmp_path / "afile"
    target.write_text("keep me")
    with pytest.raises(UserError, match="is a file"):
        export(make_checkpoint(tmp_path, seed=0), target)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt-0"]  # no temp dir left behind


def test_concurrent_exports_leave_one_complete_model(tmp_path):
    """Exports racing to the same directory (two sweeps, a retried job): each round, `out` ends up as exactly one
    of the two models, complete, and a reader polling it never sees a partial directory."""
    from safetensors.torch import load_file

    from gan_ray.core.checkpoint import load_sampler
    from gan_ray.core.model_dir import MODEL_JSON, WEIGHTS, export, load_generator

    ckpts = {who: make_checkpoint(tmp_path, seed=seed) for who, seed in (("a", 1), ("b", 2))}
    weights = {who: load_sampler(c)[0].state_dict() for who, c in ckpts.items()}
    assert not torch.equal(weights["a"]["net.0.weight"], weights["b"]["net.0.weight"])
    out = tmp_path / "models" / "digits"
    complete = {MODEL_JSON, WEIGHTS, "samples.png"}
    partial: list[list[str]] = []
    errors: list[BaseException] = []
    for _ in range(4):
        barrier = threading.Barrier(3)
        stop = threading.Event()

        def run_export(who: str) -> None:
            barrier.wait()
            try:
                export(ckpts[who], out, extra={"who": who})
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        def read() -> None:
            barrier.wait()
            while not stop.is_set():
                try:
                    before = os.stat(out).st_ino
                    names = os.listdir(out)
                    after = os.stat(out).st_ino
                except FileNotFoundError:  # between the two renames of a swap
                    continue
                # a listing of the directory that was at `out` throughout (not one swapped out meanwhile)
                if before == after and set(names) != complete:
                    partial.append(names)

        threads = [threading.Thread(target=run_export, args=(w,)) for w in ("a", "b")]
        reader = threading.Thread(target=read)
        for t in [*threads, reader]:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        reader.join()
        assert not errors, errors
        assert not partial, partial[:3]
        assert {p.name for p in out.iterdir()} == complete
        who = json.loads((out / MODEL_JSON).read_text())["who"]
        served = load_file(str(out / WEIGHTS))
        # the weights are those of the export that model.json names
        assert served.keys() == weights[who].keys()
        assert all(torch.equal(v, served[k]) for k, v in weights[who].items())
        assert load_generator(out).generate(2, seed=0).shape == (2, 1, 8, 8)
        assert sorted(p.name for p in out.parent.iterdir()) == ["digits"]  # no temp or old dirs left


# -------------------------------------------------------------------------------------------- evaluate --samples
def bad_samples(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.npz"
    images = np.full((2, 1, 28, 28), 0.5, np.float32)
    if case == "empty float":
        np.savez(path, images=np.zeros((0, 1, 28, 28), np.float32))
    elif case == "empty uint8":
        np.savez(path, images=np.zeros((0, 1, 28, 28), np.uint8))
    elif case == "uint64 labels past int64":
        np.savez(path, images=images, labels=np.array([2**63, 2**64 - 1], np.uint64))
    else:  # negative labels other than -1 (none)
        np.savez(path, images=images, labels=np.array([-5, -7]))
    return path


SAMPLE_CASES = {"empty float": "empty", "empty uint8": "empty", "uint64 labels past int64": "class indices",
                "negative labels": "class indices"}


@pytest.mark.parametrize("case,mentions", SAMPLE_CASES.items(), ids=SAMPLE_CASES.keys())
def test_evaluate_refuses_empty_samples_and_unusable_labels(tmp_path, capsys, case, mentions):
    from gan_ray.cli import main

    assert main(["evaluate", "--samples", str(bad_samples(tmp_path, case)), "--json"]) == 2
    out, err = capsys.readouterr()
    lines = own_lines(err)
    assert not own_lines(out) and len(lines) == 1 and lines[0].startswith("gan-ray evaluate: error:"), err
    assert mentions in lines[0]


def test_evaluate_empty_samples_exit_code(tmp_path):
    proc = run_cli("evaluate", "--samples", str(bad_samples(tmp_path, "empty float")), "--json", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "empty" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
