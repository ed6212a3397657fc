"""`gan-ray submit --address ...` with addresses that are not a Ray Jobs API: malformed URLs, and real HTTP servers
that answer the client's version check (GET /api/version) the way a proxy or another web server would. Each is a
one-line error with exit code 2 (through the CLI's own main(), in-process), never a traceback. No Ray cluster needed.
"""
from __future__ import annotations

import http.server
import threading
from typing import Iterator

import pytest

from tests.conftest import assert_one_line_error, cli

# Neither variable may redirect the client (Ray's JobSubmissionClient prefers them over its address argument).
CLEAN_ENV = {"RAY_API_SERVER_ADDRESS": "", "RAY_ADDRESS": ""}
JOB = ["--", "train", "--epochs", "1"]


def assert_submit_refused(r, *fragments: str) -> None:
    """One line, exit 2 (the project's check), from `gan-ray submit` itself, and nothing was submitted."""
    assert_one_line_error(r, *fragments)
    assert r.stderr.strip().startswith("gan-ray submit: error: "), r.stderr
    assert "submitted job" not in r.stdout


@pytest.mark.parametrize("address, reason", [
    ("http://127.0.0.1:notaport", "Port could not be cast to integer"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://[::1", "Invalid IPv6 URL"),
])
def test_malformed_address_is_a_one_line_error(address, reason):
    r = cli("submit", "--address", address, *JOB, env=CLEAN_ENV)
    assert_submit_refused(r, f"--address {address!r} is not a valid URL", reason)


def test_malformed_address_from_the_environment_names_the_variable():
    r = cli("submit", *JOB, env={"RAY_API_SERVER_ADDRESS": "", "RAY_ADDRESS": "http://127.0.0.1:99999"})
    assert_submit_refused(r, "RAY_ADDRESS 'http://127.0.0.1:99999' is not a valid URL")


# ------------------------------------------------------------------------ endpoints that are not Ray's dashboard
RESPONSES = {  # mode: (status, content type, body)
    "html": (200, "text/html", b"<html><body>It works!</body></html>"),
    "bad-gateway": (502, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
    "json-without-version": (200, "application/json", b'{"status": "ok"}'),
}


@pytest.fixture
def web_server(request) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free port, answering every GET as RESPONSES[mode]; yields (URL, paths requested)."""
    status, content_type, body = RESPONSES[request.param]
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.path)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("web_server, fragments", [
    ("html", ["did not answer with Ray's version JSON", "JSONDecodeError"]),
    ("bad-gateway", ["GET /api/version answered HTTP 502 Bad Gateway"]),
    ("json-without-version", ["did not answer with Ray's version JSON", "KeyError"]),
], indirect=["web_server"])
def test_endpoint_that_is_not_the_jobs_api_is_a_one_line_error(web_server, fragments):
    url, seen = web_server
    r = cli("submit", "--address", url, *JOB, env=CLEAN_ENV)
    assert_submit_refused(r, f"{url} is not a Ray Jobs API endpoint", *fragments)
    assert seen == ["/api/version"]  # the client really asked this server, once, and nothing was submitted


@pytest.mark.parametrize("web_server", ["bad-gateway"], indirect=True)
@pytest.mark.parametrize("variable", ["RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"])
def test_the_address_flag_wins_over_the_environment(web_server, variable):
    """Ray's client would send to RAY_API_SERVER_ADDRESS / RAY_ADDRESS whatever address it is given; `--address`
    must reach the server it names (here: the one answering 502), not the one in the environment (nothing there)."""
    url, seen = web_server
    r = cli("submit", "--address", url, *JOB, env={**CLEAN_ENV, variable: "http://127.0.0.1:9"})
    assert_submit_refused(r, f"{url} is not a Ray Jobs API endpoint", "HTTP 502")
    assert seen == ["/api/version"]
