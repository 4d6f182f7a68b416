"""Spans of agentcoord's calls and of the work on a task (imports OpenTelemetry).

Only :func:`agentcoord.telemetry.tracing` imports this module, and only when tracing is
on. The trace context travels as W3C trace context: in the ``traceparent`` (and
``tracestate``) gRPC metadata of a call, and as a ``traceparent`` string stored with a
task and handed to the agents with each of its assignments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
HEADERS = frozenset(PROPAGATOR.fields)
"""Metadata keys the trace context travels in (``traceparent``, ``tracestate``)."""
ATTRIBUTE_PREFIX = "agentcoord."
"""Prefix of the attributes naming what a span is about (``agentcoord.task_id``, ...)."""
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that mark a server span as an error (OpenTelemetry's gRPC conventions): the
others are the caller's doing (NOT_FOUND, INVALID_ARGUMENT, ...)."""


def environment_provider(service_name: str, environ: Mapping[str, str]) -> trace.TracerProvider:
    """Return the process's tracer provider, exporting over OTLP as the environment says.

    An SDK provider the application installed globally is used as it is. Otherwise one is
    made and installed globally: its exporter reads the endpoint, headers and so on from the
    standard ``OTEL_EXPORTER_OTLP_*`` variables, over gRPC unless the protocol variable says
    ``http/protobuf``; ``service.name`` is ``service_name`` unless ``OTEL_SERVICE_NAME``
    (or ``OTEL_RESOURCE_ATTRIBUTES``) names one.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, SdkTracerProvider):
        return current
    given = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if given else {SERVICE_NAME: service_name})
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(environ)))
    trace.set_tracer_provider(provider)
    return trace.get_tracer_provider()


def _exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.strip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class Tracing:
    """Makes agentcoord's spans with one tracer provider."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        """Trace with ``provider`` (an SDK provider, or any API implementation)."""
        self.provider = provider
        self._tracer = provider.get_tracer("agentcoord")

    # Server side

    def server_span(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Span:
        """Start the span of a call of ``method`` (its full name), not yet current.

        It continues the caller's trace when the call's metadata carries one.
        """
        carrier = {key: value for key, value in metadata if key in HEADERS}
        return self._tracer.start_span(
            method.strip("/"),
            context=PROPAGATOR.extract(carrier) if carrier else Context(),
            kind=SpanKind.SERVER,
            attributes=_rpc_attributes(method),
        )

    @staticmethod
    def current(span: Span) -> AbstractContextManager[Span]:
        """Make ``span`` the current one inside the ``with`` block (it does not end it)."""
        return trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        )

    @staticmethod
    def end_server_span(span: Span, code: grpc.StatusCode, subjects: Mapping[str, str]) -> None:
        """Note the call's status code and subjects (agent, task, key...), and end the span."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        for name, value in subjects.items():
            span.set_attribute(ATTRIBUTE_PREFIX + name, value)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    # Either side

    @contextmanager
    def span(
        self, name: str, trace_parent: str, subjects: Mapping[str, str | int]
    ) -> Iterator[str]:
        """Run the ``with`` block in a span continuing ``trace_parent``; yield its traceparent.

        ``trace_parent`` is a W3C traceparent (from a task); when empty, the span continues
        the current span. When it names another trace, the span links to the current span.
        """
        current = trace.get_current_span().get_span_context()
        parent = PROPAGATOR.extract({"traceparent": trace_parent}) if trace_parent else None
        links = (
            [Link(current)]
            if parent is not None
            and current.is_valid
            and trace.get_current_span(parent).get_span_context().trace_id != current.trace_id
            else None
        )
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            links=links,
            attributes={ATTRIBUTE_PREFIX + key: value for key, value in subjects.items()},
        ):
            yield self.trace_parent()

    @staticmethod
    def fail_current(message: str) -> None:
        """Mark the current span as failed, with ``message``."""
        trace.get_current_span().set_status(Status(StatusCode.ERROR, message))

    @staticmethod
    def trace_parent() -> str:
        """Return the W3C traceparent of the current span ("" when there is none)."""
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        return carrier.get("traceparent", "")

    # Client side

    @contextmanager
    def client_span(self, method: str, target: str) -> Iterator[list[tuple[str, str]]]:
        """Run a call of ``method`` to ``target`` in a client span; yield its metadata.

        The metadata (``traceparent``...) carries the span to the server. A call that ends
        with an :class:`grpc.aio.AioRpcError` marks the span as an error.
        """
        host, _, port = target.rpartition(":")
        attributes: dict[str, str | int] = {**_rpc_attributes(method), "server.address": host}
        if port.isdigit():
            attributes["server.port"] = int(port)
        with self._tracer.start_as_current_span(
            method.strip("/"),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier)
            try:
                yield list(carrier.items())
            except grpc.aio.AioRpcError as error:
                span.set_attribute("rpc.grpc.status_code", error.code().value[0])
                span.set_status(Status(StatusCode.ERROR, f"{error.code().name}: {error.details()}"))
                raise
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
