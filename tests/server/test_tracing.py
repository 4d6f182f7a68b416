"""OpenTelemetry traces: one trace holds a task end to end, across agents; off, none load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_service
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_service_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agentcoord.client import Agent, AgentcoordClient, SubtaskSpec, TaskSpec, WorkItem
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from tests.helpers import eventually
from tests.server.conftest import StartServer
from tests.server.test_distribution import Stub, Worker, explicit, sub, submit

DISTRIBUTION = "agentcoord.distribution.v1.DistributionService"


def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def named(spans: Sequence[ReadableSpan], name: str, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name and span.kind is kind]


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    (parent,) = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


def attribute(span: ReadableSpan, name: str) -> object:
    assert span.attributes is not None
    return span.attributes.get(f"agentcoord.{name}")


async def test_one_trace_holds_a_task_across_two_agents(start_server: StartServer) -> None:
    provider, exporter = traced()
    app = await start_server(tracer_provider=provider)
    target = f"127.0.0.1:{app.port}"

    async def handle(item: WorkItem) -> str:
        if item.local_id == "b" and item.attempt == 1:
            raise RuntimeError("first attempt fails")
        return item.local_id

    one, two = (
        Agent(
            target,
            name=name,
            agent_id=name,
            capabilities=[capability],
            handler=handle,
            tracer_provider=provider,
        )
        for name, capability in (("one", "x"), ("two", "y"))
    )
    spec = TaskSpec(
        "two parts",
        subtasks=[SubtaskSpec("a", capabilities=["x"]), SubtaskSpec("b", capabilities=["y"])],
    )
    async with one, two, AgentcoordClient(target, tracer_provider=provider) as planner:
        task = await planner.tasks.submit(spec)
        await asyncio.wait_for(planner.tasks.result(task.task_id), 30)

        async def reported() -> bool:  # the agents end their spans once the server answers
            spans = exporter.get_finished_spans()
            return len(named(spans, "work", SpanKind.INTERNAL)) == 3

        await eventually(reported)
    spans = exporter.get_finished_spans()

    (submit_call,) = named(spans, f"{DISTRIBUTION}/SubmitTask", SpanKind.CLIENT)
    (submit,) = named(spans, f"{DISTRIBUTION}/SubmitTask", SpanKind.SERVER)
    assert parent_of(submit, spans) is submit_call
    assert attribute(submit, "task_id") == task.task_id
    trace_id = submit_call.context.trace_id
    subtask_of = {s.local_id: s.subtask_id for s in task.subtasks}

    assigned = named(spans, "assign", SpanKind.INTERNAL)
    assert len(assigned) == 3  # a once, b twice (its first attempt failed)
    for span in assigned:
        assert span.context.trace_id == trace_id
        assert parent_of(span, spans) is submit
        assert attribute(span, "task_id") == task.task_id
    holders = sorted(
        (attribute(s, "subtask_id"), attribute(s, "agent_id"), attribute(s, "attempt"))
        for s in assigned
    )
    assert holders == sorted(
        [(subtask_of["a"], "one", 1), (subtask_of["b"], "two", 1), (subtask_of["b"], "two", 2)]
    )

    for work in named(spans, "work", SpanKind.INTERNAL):
        assignment = parent_of(work, spans)
        assert assignment.name == "assign"
        for name in ("agent_id", "subtask_id", "attempt"):
            assert attribute(work, name) == attribute(assignment, name)
        failed = (
            attribute(work, "subtask_id") == subtask_of["b"] and attribute(work, "attempt") == 1
        )
        report = "FailSubtask" if failed else "CompleteSubtask"
        assert work.status.status_code is (StatusCode.ERROR if failed else StatusCode.UNSET)
        (call,) = [s for s in spans if s.parent and s.parent.span_id == work.context.span_id]
        assert (call.name, call.kind) == (f"{DISTRIBUTION}/{report}", SpanKind.CLIENT)
        (served,) = [s for s in spans if s.parent and s.parent.span_id == call.context.span_id]
        assert (served.name, served.kind) == (f"{DISTRIBUTION}/{report}", SpanKind.SERVER)
        assert served.context.trace_id == trace_id
        for name in ("agent_id", "subtask_id"):
            assert attribute(served, name) == attribute(work, name)
        assert attribute(served, "task_id") == task.task_id
        assert served.attributes is not None and served.attributes["rpc.grpc.status_code"] == 0

    # The agents' own calls (Register, ...) are traced too, each in a trace of its own.
    (register,) = [
        s
        for s in named(spans, "agentcoord.discovery.v1.DiscoveryService/Register", SpanKind.SERVER)
        if attribute(s, "agent_id") == "one"
    ]
    assert register.context.trace_id != trace_id


async def test_a_claimed_assignment_continues_the_task_and_links_the_claim(
    start_server: StartServer,
) -> None:
    provider, exporter = traced()
    app = await start_server(tracer_provider=provider)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        registered = await discovery_grpc.DiscoveryServiceStub(channel).Register(
            discovery_pb.RegisterRequest(agent_id="raw", name="raw")
        )
        worker = Worker(channel, "raw", registered.session_token)
        task = await submit(Stub(channel), explicit(sub("a")))
        assignment = await worker.claim()
        assert assignment is not None
    spans = exporter.get_finished_spans()
    (submit_span,) = named(spans, f"{DISTRIBUTION}/SubmitTask", SpanKind.SERVER)
    (claim,) = named(spans, f"{DISTRIBUTION}/ClaimSubtask", SpanKind.SERVER)
    (assign,) = named(spans, "assign", SpanKind.INTERNAL)
    assert parent_of(assign, spans) is submit_span
    assert [link.context.span_id for link in assign.links] == [claim.context.span_id]
    # The agent gets the assignment span's context, to continue it around its work.
    trace_id, span_id = assignment.trace_parent.split("-")[1:3]
    assert (int(trace_id, 16), int(span_id, 16)) == (
        assign.context.trace_id,
        assign.context.span_id,
    )
    # The claim's server span names what the response leased.
    assert attribute(claim, "agent_id") == "raw"
    assert attribute(claim, "task_id") == task.task_id
    assert attribute(claim, "subtask_id") == assignment.lease.subtask_id


SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from agentcoord.client import Agent, AgentcoordClient, TaskSpec
    from agentcoord.server.app import start_app
    from agentcoord.server.config import ServerConfig

    async def main():
        app = await start_app(ServerConfig(listen="127.0.0.1:0", store=sys.argv[1]))
        target = f"127.0.0.1:{app.port}"
        async def handle(item):
            return "done"
        async with Agent(target, name="w", handler=handle), AgentcoordClient(target) as c:
            task = await c.tasks.submit(TaskSpec("t"))
            done = await asyncio.wait_for(c.tasks.result(task.task_id), 30)
            assert done == {"main": "done"}, done
        await app.stop(0)

    asyncio.run(main())
    print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
    """
)


def without_otel() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def test_tracing_off_loads_nothing_of_opentelemetry(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'off.db'}"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, store],
        env=without_otel(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


WITHOUT_THE_EXTRA = textwrap.dedent(
    """
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):  # as if the otel extra were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Missing())
    """
)


def test_an_endpoint_without_the_extra_warns_and_runs_untraced(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_EXTRA + SCRIPT, f"sqlite:///{tmp_path / 'x.db'}"],
        env={**without_otel(), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("pip install 'agentcoord[otel]'") == 1  # once per process
    assert done.stdout.splitlines()[-1] == "[]"


class Collector(trace_service_grpc.TraceServiceServicer):
    """An OTLP receiver: keeps the spans exported to it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []  # (service.name, span)

    async def Export(
        self, request: trace_service.ExportTraceServiceRequest, context: object
    ) -> trace_service.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service.ExportTraceServiceResponse()


async def test_an_otlp_endpoint_in_the_environment_turns_tracing_on(tmp_path: Path) -> None:
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SCRIPT,
            f"sqlite:///{tmp_path / 'on.db'}",
            env={**without_otel(), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await receiver.stop(0)
    assert process.returncode == 0, err.decode()
    assert "opentelemetry.sdk" in out.decode().splitlines()[-1]  # the exporter flushed at exit
    names = {(service, span.name) for service, span in collector.spans}
    assert ("agentcoord", f"{DISTRIBUTION}/SubmitTask") in names
    assert ("agentcoord", "assign") in names
    assert ("agentcoord", "work") in names  # one provider per process: the server's
    (submit,) = [
        s
        for _, s in collector.spans
        if s.name == f"{DISTRIBUTION}/SubmitTask" and s.kind == Span.SPAN_KIND_SERVER
    ]
    (work,) = [s for _, s in collector.spans if s.name == "work"]
    assert work.trace_id == submit.trace_id
