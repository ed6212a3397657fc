"""Ray Serve: the generator behind a batched, autoscaled HTTP API.

`schema` (requests and deployment settings), `render` (validate, batch-forward, encode) and `http` (FastAPI app,
errors, the plain-uvicorn baseline) have no Ray in them; `deployment` is the Serve deployment and its start/stop;
`client` talks to a running server over HTTP.

`gan_ray.serve:app` is the application builder Ray's tools use (`serve run gan_ray.serve:app model=DIR`, the
RayService's import path); it is looked up lazily so that importing the Ray-free modules does not import Serve.
"""


def __getattr__(name: str):
    if name == "app":
        from gan_ray.serve.deployment import app

        return app
    raise AttributeError(name)
