"""The HTTP listener: dashboard, ``/metrics`` and other modules' routes beside the gRPC port.

It runs in the gRPC server's process and event loop (Starlette on an embedded uvicorn), so
its handlers read the same store and follow the same change feed. The gRPC port's rules
apply: ``ServerConfig.validate`` refuses a non-loopback address without TLS and a join token
(or ``--insecure``), the same certificate and key serve HTTPS (mutual TLS with
``--tls-client-ca``), and the same tokens are checked by :class:`TokenGate`, as
``Authorization: Bearer <token>`` or, for browsers' event streams, a ``token`` query
parameter. Without the admin token the listener is read-only: only GET, HEAD and OPTIONS
pass.

Other modules add routes with :meth:`HttpListener.add_routes` (Starlette ``Route`` or
``Mount`` objects), before or after it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections.abc import Generator, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agentcoord.core.errors import AgentcoordError, PermissionDenied, Unavailable
from agentcoord.server.auth import JOIN_TOKEN_HEADER, Access, Authenticator
from agentcoord.server.config import ServerConfig, split_host_port

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods anyone may use (given a credential when the server has a join token)."""


class TokenGate:
    """ASGI middleware: the gRPC port's token rules, and writes for the admin only."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        """Guard ``app`` with ``authenticator``."""
        self._app = app
        self._authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request with 401 or 403 (JSON), or pass it on."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request = Request(scope)
        metadata = {JOIN_TOKEN_HEADER: request.headers.get(JOIN_TOKEN_HEADER, "")}
        authorization = request.headers.get("authorization", "")
        if not authorization and request.query_params.get("token"):
            authorization = f"Bearer {request.query_params['token']}"
        metadata["authorization"] = authorization
        try:
            identity = await self._authenticator.identify(metadata, Access.READ)
            if request.method not in READ_METHODS and not identity.admin:
                raise PermissionDenied(
                    f"{request.method} {request.url.path}: changes need the admin token "
                    "(authorization: Bearer <admin token>); without it the listener is read-only",
                    reason="ADMIN_TOKEN_REQUIRED",
                )
        except AgentcoordError as error:
            status = 403 if isinstance(error, PermissionDenied) else 401
            response = JSONResponse(
                {"error": {"status": status, "reason": error.reason, "message": error.message}},
                status_code=status,
            )
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


class HttpListener:
    """The HTTP side of one server process."""

    def __init__(self, config: ServerConfig, authenticator: Authenticator) -> None:
        """Prepare (but do not bind) a listener on ``config.http_listen``."""
        self._config = config
        self._starlette = Starlette(routes=[Route("/healthz", self._healthz, methods=["GET"])])
        self._gate = TokenGate(self._starlette, authenticator)
        self._server: _EmbeddedServer | None = None
        self._socket: socket.socket | None = None
        self._serving: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()
        """Set when the listener stops: long-lived responses (event streams) end on it."""

    async def _healthz(self, request: Request) -> Response:
        if self.closing.is_set():
            return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
        return JSONResponse({"status": "SERVING"})

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        """Serve ``routes`` (Starlette ``Route``/``Mount``), behind the token rules."""
        self._starlette.router.routes.extend(routes)

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for port 0)."""
        assert self._socket is not None, "bind() first"
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """The listener's base URL, such as ``http://127.0.0.1:8080/``."""
        host, _ = split_host_port(self._config.http_listen, "http_listen")
        scheme = "https" if self._config.tls_cert else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.port}/"

    def bind(self) -> None:
        """Bind the port now, so a busy one fails before anything starts.

        Raises:
            Unavailable: the address is in use (another server?) or cannot be bound.
        """
        host, port = split_host_port(self._config.http_listen, "http_listen")
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            # No SO_REUSEPORT: a second server on a busy port must fail, not share it.
            self._socket = socket.create_server(address, family=family, reuse_port=False)
        except OSError:
            raise Unavailable(
                f"cannot listen on {self._config.http_listen} (--http-listen): the port is in "
                "use (another server?) or the address is not this machine's"
            ) from None

    async def start(self) -> None:
        """Serve on the bound socket in the running event loop."""
        assert self._socket is not None, "bind() first"
        config = self._config
        self._server = _EmbeddedServer(
            uvicorn.Config(
                self._gate,
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                proxy_headers=False,
                ws="none",
                timeout_graceful_shutdown=math.ceil(config.grace),
                ssl_certfile=config.tls_cert or None,
                ssl_keyfile=config.tls_key or None,
                ssl_ca_certs=config.tls_client_ca or None,
                ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
            )
        )
        self._serving = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started and not self._serving.done():
            await asyncio.sleep(0.01)
        if self._serving.done():  # it could not start: say why
            self._serving.result()

    async def stop(self) -> None:
        """End event streams, let requests finish within the grace period, close the port."""
        self.closing.set()
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
        elif self._socket is not None:
            self._socket.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside a running server: the process's own signal handlers stay in charge."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Install no signal handlers (``serve`` in ``app.py`` has SIGTERM and SIGINT)."""
        yield
