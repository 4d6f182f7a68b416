"""OpenTelemetry traces, optional: on with the ``otel`` extra and an OTLP endpoint set.

Tracing is off unless a tracer provider is given (tests, embedding applications) or
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and the
OpenTelemetry SDK is installed. Off, nothing of OpenTelemetry is imported: callers hold
``None`` instead of a :class:`~agentcoord.telemetry.spans.Tracing` and skip every span.
This module imports OpenTelemetry only when tracing is on.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentcoord.telemetry.spans import Tracing

log = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
"""Either one set turns tracing on (when the SDK is installed)."""


def tracing(
    service_name: str,
    tracer_provider: Any = None,
    environ: Mapping[str, str] | None = None,
) -> Tracing | None:
    """Return the tracing to use, or None when tracing is off.

    Args:
        service_name: ``service.name`` of the spans when the provider is made here and
            ``OTEL_SERVICE_NAME`` is not set.
        tracer_provider: An OpenTelemetry ``TracerProvider`` to use; when None, the
            environment decides (see the module's docstring).
        environ: The environment; ``os.environ`` when None.
    """
    if tracer_provider is not None:
        from agentcoord.telemetry.spans import Tracing

        return Tracing(tracer_provider)
    environ = os.environ if environ is None else environ
    if not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    try:
        from agentcoord.telemetry.spans import Tracing, environment_provider

        provider = environment_provider(service_name, environ)
    except ImportError as error:
        _warn_missing(str(error))
        return None
    return Tracing(provider)


@functools.cache
def _warn_missing(error: str) -> None:
    """Say once per process that tracing was asked for but cannot be had."""
    log.warning(
        "an OTLP endpoint is set but the OpenTelemetry SDK or exporter is missing (%s): "
        "no traces; install them with pip install 'agentcoord[otel]'",
        error,
    )
