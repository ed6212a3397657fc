"""Submit any `gan-ray` command to a Ray cluster as a Ray Job, follow its logs, and return its status.

The job carries the project with it: the runtime environment's `working_dir` is this source tree (minus virtual
environments, runs and other bulky or private paths), so the code that runs on the cluster is the code you are
looking at; the cluster's image only has to provide the dependencies (see k8s/Dockerfile, cluster/*.yaml).

Ray >= 2.59 turns on token authentication for clusters. The client sends the cluster's token as a bearer header;
it is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (Ray's own lookup order). Nothing here
turns authentication off: a cluster that wants a token we do not have is a one-line error naming where to put it.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from gan_ray.core.env import scoped_env
from gan_ray.core.errors import UserError, one_line

AGENT_WAIT_S = 60.0  # how long a submission retries while the cluster has no job agent ready yet
# gitignore-style patterns (relative to the project root) kept out of the uploaded working_dir: environments,
# outputs and caches are large, machine-specific, or private; the cluster has its own.
WORKING_DIR_EXCLUDES = (
    "/.venv/", "/venv/", "/.git/", "/runs/", "/demo/", "/build/", "/dist/", "/.pytest_cache/", "/.raykit/",
    "/.whl/", "__pycache__/", "*.pyc", "*.egg-info/", "/.mypy_cache/", "/.ruff_cache/",
)
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_PYTHON = "python"  # the cluster's interpreter (the image's); `--python` overrides it


# ------------------------------------------------------------------------------------------------ the project
def project_root() -> Path | None:
    """The source checkout this package was imported from (a directory with gan-ray's pyproject.toml), or None
    for a plain site-packages install."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "gan-ray"' in pyproject.read_text():
        return root
    return None


def project_runtime_env(working_dir: str | Path | None = None, *, env_vars: dict[str, str] | None = None,
                        extra_excludes: Sequence[str] = ()) -> dict:
    """The runtime_env that ships the project: `working_dir` = the source tree (relative paths in the command
    then resolve inside it, as they do here), or the installed package as a py_module outside a checkout."""
    env = {"PYTHONUNBUFFERED": "1", **(env_vars or {})}  # unbuffered: logs arrive as they are written
    root = Path(working_dir).expanduser().resolve() if working_dir else project_root()
    if root is None:
        package_dir = Path(__file__).resolve().parent
        return {"py_modules": [str(package_dir)], "env_vars": env,
                "excludes": ["__pycache__/", "*.pyc"]}
    if not root.is_dir():
        raise UserError(f"--working-dir {root} is not a directory")
    return {"working_dir": str(root), "excludes": [*WORKING_DIR_EXCLUDES, *extra_excludes], "env_vars": env}


# --------------------------------------------------------------------------------------------- the entrypoint
def validate_entrypoint(argv: Sequence[str], check: Callable[[list[str]], None] | None = None) -> list[str]:
    """The gan-ray command to run, without a leading `--` or `gan-ray`. `check` (the CLI passes its own parser)
    refuses a command that would fail on the cluster: a typo should cost a second here, not a round trip."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError("nothing to submit: give a gan-ray command after `--`, e.g. "
                        "`gan-ray submit --address http://HEAD:8265 -- train --epochs 5`")
    if argv[0] in ("gan-ray", "gan_ray"):
        argv = argv[1:]
    if argv and argv[0] == "submit":
        raise UserError("a job cannot submit another job: give the command to run after `--` (e.g. train)")
    if check is not None:
        check(argv)
    return argv


def entrypoint_command(argv: Sequence[str], python: str = DEFAULT_PYTHON) -> str:
    """The shell command the job runs. `python -m gan_ray.cli` (not the `gan-ray` script) so that the uploaded
    working_dir's code runs even where an older gan-ray is installed in the image."""
    return shlex.join([python, "-m", "gan_ray.cli", *argv])


def relative_storage_warning(argv: Sequence[str], outputs: dict[str, str]) -> str | None:
    """Runs and models written to relative paths land in the job's temporary working_dir on the cluster.
    `outputs`: the command's output flags and their values."""
    for flag, value in outputs.items():
        if value and not value.startswith(("/", "~")) and "://" not in value:
            return (f"note: --{flag} {value} is relative: on the cluster it resolves inside the job's temporary "
                    f"working directory; use a path on shared storage (e.g. /mnt/shared/...) to keep the output")
    return None


# ----------------------------------------------------------------------------------------- address and auth
def normalise_address(address: str | None) -> str:
    """The Jobs API (dashboard) URL: http(s)://HOST:PORT. A GCS address (HOST:6379) or ray:// is a common slip."""
    source = "--address"
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):
                address, source = os.environ[var], var
                break
    if not address:
        raise UserError("no cluster given: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API)")
    address = address.strip().rstrip("/")
    try:
        parsed = urlparse(address)
        _ = parsed.port  # parsed lazily: a non-numeric or out-of-range port raises here (not later, in requests)
    except ValueError as exc:  # "http://[::1" (unclosed IPv6 bracket), "http://HOST:notaport", "http://HOST:99999"
        raise UserError(f"{source} {address!r} is not a valid URL ({exc}); expected e.g. http://HEAD:8265") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{source} must be the Ray Jobs API URL, e.g. http://HEAD:8265, got {address!r}")
    return address


def load_auth_token() -> tuple[str | None, str]:
    """The cluster token and where it came from, in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path_env:
        path = Path(path_env).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env} cannot be read: {exc.strerror}") from None
        if not token:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path_env} is empty")
        return token, str(path)
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, ""


def auth_headers(address: str) -> tuple[dict[str, str], str]:
    """Bearer header for the token (if any) and a description of its source. Warns before a token travels over
    plain HTTP to another machine (use https or `ray dashboard`'s SSH tunnel)."""
    token, source = load_auth_token()
    if not token:
        return {}, ""
    host = urlparse(address).hostname or ""
    if urlparse(address).scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: sending the Ray auth token over plain HTTP to {host}; prefer https or an SSH tunnel "
              f"(`ray dashboard CLUSTER.yaml`)", file=sys.stderr)
    return {"Authorization": f"Bearer {token}"}, source


_NO_TOKEN_HELP = ("the cluster requires a Ray auth token and none was found: set RAY_AUTH_TOKEN, or "
                  "RAY_AUTH_TOKEN_PATH, or write it to ~/.ray/auth_token (`ray get-auth-token` prints it on the "
                  "head node)")


def _quiet_client_logs() -> None:
    """Ray's client logs every upload step at INFO, and warns that .git/.venv are skipped (we exclude them
    anyway); keep the console for the job's own output."""
    import logging

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def connect(address: str):
    """A JobSubmissionClient for `address` that authenticates with the cluster token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    import requests

    _quiet_client_logs()
    headers, source = auth_headers(address)
    not_jobs_api = f"{address} is not a Ray Jobs API endpoint"
    try:
        # Ray's client prefers RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, over the address it is given; the address
        # resolved here (from --address, else those variables) is the one to use, so it is what the client sees.
        with scoped_env("RAY_API_SERVER_ADDRESS", address):
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise UserError(_NO_TOKEN_HELP if not headers else
                        f"the cluster at {address} rejected the auth token from {source}") from None
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None
    except RuntimeError as exc:
        raise UserError(f"{not_jobs_api}: {one_line(exc, 200)}") from None
    # The client's version check (GET /api/version) on something that is not Ray's dashboard: a proxy or another
    # web server answering an error status, HTML instead of JSON, or JSON without a parseable "ray_version".
    except requests.HTTPError as exc:
        response = exc.response
        raise UserError(f"{not_jobs_api}: GET /api/version answered HTTP {response.status_code} "
                        f"{response.reason or ''}".rstrip()) from None
    except (requests.exceptions.InvalidJSONError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{not_jobs_api}: GET /api/version did not answer with Ray's version JSON "
                        f"({type(exc).__name__}: {one_line(exc, 200)})") from None
    except requests.RequestException as exc:  # timeouts, redirect loops, URLs requests cannot use
        raise UserError(f"cannot reach the Ray Jobs API at {address}: {one_line(exc, 200)}") from None


# ------------------------------------------------------------------------------------------------- submission
@dataclass
class Submission:
    address: str
    submission_id: str
    entrypoint: str


def submit(address: str, argv: Sequence[str], *, runtime_env: dict | None = None, python: str = DEFAULT_PYTHON,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
           entrypoint_num_gpus: float | None = None, client=None) -> Submission:
    """Validate `argv` (a gan-ray command), then submit it. Returns the submission id."""
    from ray.exceptions import AuthenticationError

    address = normalise_address(address)
    argv = validate_entrypoint(argv)
    entrypoint = entrypoint_command(argv, python)
    client = client or connect(address)
    env = runtime_env if runtime_env is not None else project_runtime_env()
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id,
                                       entrypoint_num_cpus=entrypoint_num_cpus,
                                       entrypoint_num_gpus=entrypoint_num_gpus,
                                       metadata={"submitted_by": "gan-ray", "command": argv[0]})
            return Submission(address, job_id, entrypoint)
        except AuthenticationError:
            raise UserError(_NO_TOKEN_HELP) from None
        except (RuntimeError, ValueError) as exc:
            # A cluster whose node agents have not registered with the head yet (it has just started, or is
            # loaded) answers "No available agent to submit job, please try again later": that is what to do.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise UserError(f"the cluster refused the job: {one_line(exc, 300)}") from None


def follow(client, job_id: str, write: Callable[[str], None] | None = None) -> str:
    """Stream the job's logs (to `write`, default this process's stdout at the time) until it ends; returns its
    final status. Falls back to polling if the log stream drops (the job keeps running either way)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            (write or sys.stdout.write)(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # websocket refused or closed abnormally: the job runs on, keep waiting on it
        print(f"(log stream interrupted: {exc}; waiting for the job to finish)", file=sys.stderr)
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATES:
            return status
        time.sleep(1.0)


def exit_code(status: str) -> int:
    """0 only for SUCCEEDED: a failed or stopped job is a failed command."""
    return 0 if status == "SUCCEEDED" else 1
