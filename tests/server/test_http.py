"""The HTTP listener beside the gRPC port: tokens, TLS, a busy port, the start-up line."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from agentcoord.core.errors import InvalidInput
from agentcoord.server.config import ServerConfig
from tests.helpers import make_cert
from tests.server.conftest import StartServer
from tests.server.test_runtime import _serve_command, _start_serve, _stop


async def test_healthz_answers_on_the_http_port(start_server: StartServer) -> None:
    app = await start_server(http_listen="127.0.0.1:0")
    assert app.http is not None
    assert app.http.url == f"http://127.0.0.1:{app.http.port}/"
    async with httpx.AsyncClient(base_url=app.http.url) as client:
        answer = await client.get("/healthz")
        assert answer.status_code == 200
        assert answer.json() == {"status": "SERVING"}
        assert (await client.get("/no-such-page")).status_code == 404


async def test_tokens_are_checked_and_writes_need_the_admin_token(
    start_server: StartServer,
) -> None:
    app = await start_server(
        http_listen="127.0.0.1:0", join_token="let-me-in", admin_token="root-secret"
    )
    assert app.http is not None
    async with httpx.AsyncClient(base_url=app.http.url) as client:
        refused = await client.get("/healthz")
        assert refused.status_code == 401
        assert "requires a join, session or admin token" in refused.json()["error"]["message"]
        wrong = await client.get("/healthz", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for credential in [
            {"headers": {"x-agentcoord-join-token": "let-me-in"}},
            {"headers": {"authorization": "Bearer root-secret"}},
            {"params": {"token": "root-secret"}},
        ]:
            assert (await client.get("/healthz", **credential)).status_code == 200  # type: ignore[arg-type]
        read_only = await client.post("/healthz", headers={"x-agentcoord-join-token": "let-me-in"})
        assert read_only.status_code == 403
        assert "need the admin token" in read_only.json()["error"]["message"]
        # The admin passes the gate (and meets the route's own answer).
        admin = await client.post("/healthz", headers={"authorization": "Bearer root-secret"})
        assert admin.status_code == 405


def test_beyond_loopback_needs_tls_and_a_join_token_or_insecure() -> None:
    with pytest.raises(InvalidInput) as refused:
        ServerConfig(http_listen="0.0.0.0:8080").validate()
    assert refused.value.field == "http_listen"
    ServerConfig(http_listen="0.0.0.0:8080", insecure=True).validate()
    with pytest.raises(InvalidInput) as malformed:
        ServerConfig(http_listen="8080").validate()
    assert malformed.value.field == "http_listen"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_https_with_the_servers_certificate(
    start_server: StartServer, tmp_path: Path
) -> None:
    key, cert = make_cert(tmp_path, "localhost", "-addext", "subjectAltName=IP:127.0.0.1")
    app = await start_server(http_listen="127.0.0.1:0", tls_cert=str(cert), tls_key=str(key))
    assert app.http is not None and app.http.url.startswith("https://127.0.0.1:")
    trust = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(base_url=app.http.url, verify=trust) as client:
        assert (await client.get("/healthz")).json() == {"status": "SERVING"}
    async with httpx.AsyncClient(base_url=app.http.url.replace("https", "http")) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/healthz")


async def test_serve_prints_the_url_and_a_busy_http_port_exits_69(tmp_path: Path) -> None:
    process, _, line = await _start_serve(
        "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/http.db",
        "--http-listen", "127.0.0.1:0",
    )  # fmt: skip
    try:
        found = re.search(r"; dashboard and metrics at (http://127\.0\.0\.1:(\d+)/)$", line.strip())
        assert found, line
        async with httpx.AsyncClient(base_url=found[1]) as client:
            assert (await client.get("/healthz")).status_code == 200
        busy = await asyncio.create_subprocess_exec(
            *_serve_command(
                "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/second.db",
                "--http-listen", f"127.0.0.1:{found[2]}",
            ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(busy.communicate(), 60)
        assert busy.returncode == 69, err.decode()
        assert out == b""
        assert err.decode() == (
            f"agentcoord: cannot listen on 127.0.0.1:{found[2]} (--http-listen): the port is in "
            "use (another server?) or the address is not this machine's\n"
        )
    finally:
        await _stop(process)


async def test_an_empty_http_listen_serves_no_http(start_server: StartServer) -> None:
    app = await start_server(http_listen="")
    assert app.http is None
    with socket.create_connection(("127.0.0.1", app.port)):
        pass  # the gRPC port is there
