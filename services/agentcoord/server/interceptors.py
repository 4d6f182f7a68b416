"""The one wrapper around every handler: identity, error mapping, logging, metrics, spans.

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
from agentcoord.server.auth import (
    JOIN_TOKEN_HEADER,
    Access,
    Authenticator,
    bind_identity,
    current_identity,
)
from agentcoord.server.errors import abort_with
from agentcoord.server.metrics import Metrics

log = logging.getLogger("agentcoord.rpc")

DEFAULT_REQUEST_TIMEOUT = 60.0
"""Seconds a call may take from its headers to its request message, unless configured."""

Behavior = Callable[..., Any]
if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from agentcoord.telemetry.spans import Tracing

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
        tracing: Tracing | None = None,
    ) -> None:
        """Wrap the methods named in ``access`` (full method names); others pass through.

        With ``metrics``, each finished call is observed and open streams are counted. A
        call whose one request message has not arrived ``request_timeout`` seconds after
        its headers ends with DEADLINE_EXCEEDED. With ``tracing``, each call gets a server
        span (current while a unary call's handler runs) continuing the caller's trace.
        """
        self._authenticator = authenticator
        self._access = dict(access)
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._tracing = tracing
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        """Each method's handler as grpc gave it and as wrapped: built once, not per call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Return the handler with its behaviour wrapped (once per method, then cached)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        access = self._access.get(method)
        # Calls with one request message are served as client-streaming calls (the wire
        # is the same): grpc would otherwise wait for the message without any limit
        # before the handler runs, holding the call's memory. Health and reflection
        # (no access entry) get only that time limit.
        if handler.unary_unary:
            unary = handler.unary_unary
            return grpc.stream_unary_rpc_method_handler(
                (
                    self._reading_request(unary)
                    if access is None
                    else self._wrap_unary(method, access, unary, reading=True)
                ),
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
            if key in CREDENTIAL_HEADERS and isinstance(value, str)
        }
        names = (
            certificate_names(context.auth_context())
            if self._authenticator.binds_certificates
            else ()
        )
        bind_identity(await self._authenticator.identify(metadata, access, names))

    async def _request(self, context: Context) -> Any:
        """Return the call's one request message, or end the call if it is late or missing.

        It is read with ``context.read()``; the handler's request iterator is never used.
        """
        try:
            async with asyncio.timeout(self._request_timeout):
                request = await context.read()
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self._request_timeout:g} s of "
                "the call's headers (--request-timeout)",
            )
        if request is grpc.aio.EOF:
            await abort_with(
                context, InvalidInput("", "the call ended without sending its request message")
            )
        return request

    def _reading_request(self, behavior: Behavior) -> Behavior:
        async def unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await behavior(await self._request(context), context)

        return unary

    def _streaming_request(self, behavior: Behavior) -> Behavior:
        if not inspect.isasyncgenfunction(behavior):  # it writes (health's Watch)

            async def writing(requests: AsyncIterator[Any], context: Context) -> None:
                await behavior(await self._request(context), context)

            return writing

        async def stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for response in behavior(await self._request(context), context):
                yield response

        return stream

    def _wrap_unary(
        self, method: str, access: Access, behavior: Behavior, *, reading: bool = False
    ) -> Behavior:
        """Wrap a call with one response; ``reading``: it also reads its one request first.

        Reading in the same coroutine saves the unary calls a second wrapper per call.
        """

        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            tracing = self._tracing
            span = self._span(method, context)
            response = None
            try:
                if reading:
                    request = await self._request(context)
                await self._identify(context, access)
                if tracing is None or span is None:
                    return await behavior(request, context)
                with tracing.current(span):
                    response = await behavior(request, context)
                return response
            except Exception as error:
                if _is_abort(error):
                    raise
                await abort_with(context, error)
            finally:
                self._finished(method, context, started, request, span=span, response=response)

        return unary

    def _wrap_stream(self, method: str, access: Access, behavior: Behavior) -> Behavior:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span = self._span(method, context)
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
                self._finished(method, context, started, request, cancelled=cancelled, span=span)

        return stream

    def _span(self, method: str, context: Context) -> Span | None:
        """Start the call's server span, when tracing."""
        if self._tracing is None:
            return None
        return self._tracing.server_span(method, context.invocation_metadata() or ())

    def _finished(
        self,
        method: str,
        context: Context,
        started: float,
        request: Any,
        *,
        cancelled: bool = False,
        span: Span | None = None,
        response: Any = None,
    ) -> None:
        """Observe, log and end the span of one finished call."""
        if self._metrics is not None or span is not None:
            code = context.code()
            status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
            if cancelled:
                status = grpc.StatusCode.CANCELLED
            if self._metrics is not None:
                self._metrics.rpc(method, status.name, time.perf_counter() - started)
            if span is not None and self._tracing is not None:
                subjects = _subjects(request)
                if response is not None:
                    subjects = _subjects_within(response, depth=2) | subjects
                self._tracing.end_server_span(span, status, subjects)
        _log_call(method, context, started, request)


CREDENTIAL_HEADERS = frozenset({"authorization", JOIN_TOKEN_HEADER})
"""The metadata keys :class:`~agentcoord.server.auth.Authenticator` reads; no other is copied."""

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


def _subjects_within(message: Any, depth: int) -> dict[str, str]:
    """The subject fields set in ``message`` and in its set message fields, ``depth`` deep.

    A response names what the request could not: the task SubmitTask created, the task of
    a completed sub-task, the sub-task ClaimSubtask leased.
    """
    found: dict[str, str] = {}
    for field, value in message.ListFields():
        if field.name in SUBJECT_FIELDS and isinstance(value, str):
            found.setdefault(field.name, value)
        elif depth > 0 and field.message_type is not None and not field.is_repeated:
            found = _subjects_within(value, depth - 1) | found
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
