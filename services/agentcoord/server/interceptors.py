"""The one wrapper around every handler: identity, error mapping, logging.

grpc.aio runs a handler's behaviour in its own task, so the interceptor wraps the
behaviour itself (not just the lookup) to bind the caller's identity in a context
variable for exactly that call and to turn domain errors into statuses by the table in
:mod:`agentcoord.server.errors`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from agentcoord.core.errors import InvalidInput
from agentcoord.server.auth import Access, Authenticator, bind_identity, current_identity
from agentcoord.server.errors import abort_with
from agentcoord.server.metrics import Metrics

log = logging.getLogger("agentcoord.rpc")

DEFAULT_REQUEST_TIMEOUT = 60.0
"""Seconds a call may take from its headers to its request message, unless configured."""

Behavior = Callable[..., Any]
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, maps errors and logs every call to an agentcoord service."""

    def __init__(
        self,
        authenticator: Authenticator,
        access: Mapping[str, Access],
        metrics: Metrics | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        """Wrap the methods named in ``access`` (full method names); others pass through.

        With ``metrics``, each finished call is observed and open streams are counted. A
        call whose one request message has not arrived ``request_timeout`` seconds after
        its headers ends with DEADLINE_EXCEEDED.
        """
        self._authenticator = authenticator
        self._access = dict(access)
        self._metrics = metrics
        self._request_timeout = request_timeout

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Return the handler with its behaviour wrapped."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        access = self._access.get(method)
        # Calls with one request message are served as client-streaming calls (the wire
        # is the same): grpc would otherwise wait for the message without any limit
        # before the handler runs, holding the call's memory. Health and reflection
        # (no access entry) get only that time limit.
        if handler.unary_unary:
            unary = handler.unary_unary
            if access is not None:
                unary = self._wrap_unary(method, access, unary)
            return grpc.stream_unary_rpc_method_handler(
                self._reading_request(unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            stream = handler.unary_stream
            if access is not None:
                stream = self._wrap_stream(method, access, stream)
            return grpc.stream_stream_rpc_method_handler(
                self._streaming_request(stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if access is None:
            return handler
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, access, handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        assert handler.stream_unary is not None
        return grpc.stream_unary_rpc_method_handler(
            self._wrap_unary(method, access, handler.stream_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )

    async def _identify(self, context: Context, access: Access) -> None:
        # Each call runs in its own task with its own context, so the binding ends with it.
        metadata = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        names = certificate_names(context.auth_context())
        bind_identity(await self._authenticator.identify(metadata, access, names))

    async def _request(self, requests: AsyncIterator[Any], context: Context) -> Any:
        """Return the call's one request message, or end the call if it is late or missing."""
        try:
            async with asyncio.timeout(self._request_timeout):
                return await anext(aiter(requests))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self._request_timeout:g} s of "
                "the call's headers (--request-timeout)",
            )
        except StopAsyncIteration:
            await abort_with(
                context, InvalidInput("", "the call ended without sending its request message")
            )

    def _reading_request(self, behavior: Behavior) -> Behavior:
        async def unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(await self._request(requests, context), context)

        return unary

    def _streaming_request(self, behavior: Behavior) -> Behavior:
        if not inspect.isasyncgenfunction(behavior):  # it writes (health's Watch)

            async def writing(requests: AsyncIterator[Any], context: Context) -> None:
                await behavior(await self._request(requests, context), context)

            return writing

        async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for response in behavior(await self._request(requests, context), context):
                yield response

        return stream

    def _wrap_unary(self, method: str, access: Access, behavior: Behavior) -> Behavior:
        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                await self._identify(context, access)
                return await behavior(request, context)
            except Exception as error:
                if _is_abort(error):
                    raise
                await abort_with(context, error)
            finally:
                self._finished(method, context, started, request)

        return unary

    def _wrap_stream(self, method: str, access: Access, behavior: Behavior) -> Behavior:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            gauge = None if self._metrics is None else self._metrics.stream(method)
            if gauge is not None:
                gauge.inc()
            cancelled = False
            try:
                await self._identify(context, access)
                async for response in behavior(request, context):
                    yield response
            except Exception as error:
                if _is_abort(error):
                    raise
                await abort_with(context, error)
            except asyncio.CancelledError:  # the caller went away
                cancelled = True
                raise
            finally:
                if gauge is not None:
                    gauge.dec()
                self._finished(method, context, started, request, cancelled=cancelled)

        return stream

    def _finished(
        self,
        method: str,
        context: Context,
        started: float,
        request: Any,
        *,
        cancelled: bool = False,
    ) -> None:
        """Observe and log one finished call."""
        if self._metrics is not None:
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            if cancelled:
                name = "CANCELLED"
            self._metrics.rpc(method, name, time.perf_counter() - started)
        _log_call(method, context, started, request)


CERTIFICATE_NAME_PROPERTIES = ("peer_dns", "peer_uri", "x509_common_name")
"""Properties of grpc's auth context naming a verified client certificate: DNS and URI
subject alternative names, and the common name."""


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """Return the names of the caller's client certificate (none without mutual TLS)."""
    return [
        value.decode(errors="replace")
        for prop in CERTIFICATE_NAME_PROPERTIES
        for value in auth_context.get(prop, ())
    ]


def _is_abort(error: BaseException) -> bool:
    """Whether ``error`` is grpc's own signal that the call was already aborted."""
    return isinstance(error, grpc.aio.AbortError)


SUBJECT_FIELDS = ("agent_id", "task_id", "subtask_id", "key")
"""Request fields logged with a call when set: who or what the call was about."""


def _subjects(request: Any) -> dict[str, str]:
    """The call's subject fields set in ``request`` (a message; not a request stream)."""
    found: dict[str, str] = {}
    descriptor = getattr(request, "DESCRIPTOR", None)
    for name in SUBJECT_FIELDS:
        if descriptor is not None and name in descriptor.fields_by_name:
            value = getattr(request, name)
            if isinstance(value, str) and value:
                found[name] = value
    if "agent_id" not in found:
        session = current_identity().session
        if session is not None:
            found["agent_id"] = session.agent_id
    return found


def _log_call(method: str, context: Context, started: float, request: Any) -> None:
    """Log one finished call at DEBUG, its facts as fields (``extra``) and in the message."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    code = context.code()
    facts: dict[str, Any] = {
        "rpc": method,
        "code": code.name if isinstance(code, grpc.StatusCode) else "OK",
        "peer": context.peer(),
        "ms": round((time.perf_counter() - started) * 1000, 2),
        **_subjects(request),
    }
    text = " ".join(f"{name}={value}" for name, value in facts.items() if name != "rpc")
    log.debug("rpc %s %s", method, text, extra=facts)
