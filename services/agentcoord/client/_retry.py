"""Retry policies (tenacity): transient outages are retried with jittered back-off."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from agentcoord.client._errors import RPCError

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Codes an idempotent call is retried on."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential back-off with jitter."""

    max_attempts: int = 6
    """Attempts in all, the first included."""
    max_delay: float = 15.0
    """Seconds after which no further attempt starts."""
    initial_backoff: float = 0.05
    """Seconds before the first retry (before jitter)."""
    max_backoff: float = 2.0
    """Longest pause between two attempts (before jitter)."""
    jitter: float = 0.1
    """Random extra pause, up to this many seconds, so colliding clients spread out."""

    def retrying(
        self,
        codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES,
        *,
        at_once: frozenset[grpc.StatusCode] = frozenset(),
    ) -> AsyncRetrying:
        """Return a tenacity controller that retries RPCErrors with one of ``codes``.

        The first failure with a code of ``at_once`` is retried without a pause (a conflict
        whose error carries what the retry needs); later ones back off as usual.
        """
        backoff = wait_exponential(
            multiplier=self.initial_backoff, max=self.max_backoff
        ) + wait_random(0, self.jitter)
        paused: set[grpc.StatusCode] = set()

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            code = error.code if isinstance(error, RPCError) else None
            if code in at_once and code not in paused:
                paused.add(code)
                return 0.0
            return float(backoff(state))

        return AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, RPCError) and e.code in codes),
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.max_delay),
            wait=wait,
            reraise=True,
        )
