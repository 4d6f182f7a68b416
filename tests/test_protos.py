"""Proto style rules (architecture guide section 2.5), checked on descriptors built by protoc.

The generated ``_pb2`` modules carry no comments, so the protos are compiled here into a
descriptor set with ``--include_source_info`` and the rules are read from it. This needs no
network and no ``buf`` binary; ``make lint-proto`` runs ``buf lint`` on top when npm exists.
"""

from __future__ import annotations

import importlib.resources
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUR_PREFIX = "agentcoord/"

# The RPC names of design-brief.md section 2: the contract clients, docs and checks rely on.
# Value: (client_streaming, server_streaming).
UNARY = (False, False)
SERVER_STREAM = (False, True)
BIDI_STREAM = (True, True)
EXPECTED_RPCS: dict[str, dict[str, tuple[bool, bool]]] = {
    "agentcoord.discovery.v1.DiscoveryService": {
        "Register": UNARY,
        "Heartbeat": BIDI_STREAM,
        "Deregister": UNARY,
        "GetAgent": UNARY,
        "ListAgents": UNARY,
        "WatchAgents": SERVER_STREAM,
        "GetSummary": UNARY,
    },
    "agentcoord.distribution.v1.DistributionService": {
        "AnalyzeTask": UNARY,
        "SubmitTask": UNARY,
        "GetTask": UNARY,
        "ListTasks": UNARY,
        "ListSubtasks": UNARY,
        "CancelTask": UNARY,
        "WatchTask": SERVER_STREAM,
        "StreamAssignments": SERVER_STREAM,
        "ClaimSubtask": UNARY,
        "CompleteSubtask": UNARY,
        "FailSubtask": UNARY,
    },
    "agentcoord.statesync.v1.StateSyncService": {
        "GetState": UNARY,
        "PutState": UNARY,
        "DeleteState": UNARY,
        "ModifyState": UNARY,
        "ListStates": UNARY,
        "WatchStates": SERVER_STREAM,
        "Transact": UNARY,
        "ListEvents": UNARY,
        "WatchEvents": SERVER_STREAM,
    },
}

# Field numbers of descriptor.proto, used to build SourceCodeInfo paths.
FILE_MESSAGE_TYPE = descriptor_pb2.FileDescriptorProto.MESSAGE_TYPE_FIELD_NUMBER
FILE_ENUM_TYPE = descriptor_pb2.FileDescriptorProto.ENUM_TYPE_FIELD_NUMBER
FILE_SERVICE = descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER
MESSAGE_FIELD = descriptor_pb2.DescriptorProto.FIELD_FIELD_NUMBER
MESSAGE_NESTED_TYPE = descriptor_pb2.DescriptorProto.NESTED_TYPE_FIELD_NUMBER
MESSAGE_ENUM_TYPE = descriptor_pb2.DescriptorProto.ENUM_TYPE_FIELD_NUMBER
MESSAGE_ONEOF_DECL = descriptor_pb2.DescriptorProto.ONEOF_DECL_FIELD_NUMBER
ENUM_VALUE = descriptor_pb2.EnumDescriptorProto.VALUE_FIELD_NUMBER
SERVICE_METHOD = descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER

FieldType = descriptor_pb2.FieldDescriptorProto


@dataclass(frozen=True)
class Element:
    """One commentable element of a proto file: its kind, full name and source path."""

    kind: str
    name: str
    path: tuple[int, ...]


def _well_known_include() -> Path:
    """Returns the folder of the well-known protos (google/protobuf/*.proto) in grpc_tools."""
    return Path(str(importlib.resources.files("grpc_tools") / "_proto"))


def _proto_files() -> list[str]:
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    files = _proto_files()
    assert files, f"no .proto files under {PROTO_ROOT}"
    out = tmp_path_factory.mktemp("protos") / "descriptor_set.binpb"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{_well_known_include()}",
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out}",
        *files,
    ]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


@pytest.fixture(scope="module")
def our_files(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> list[descriptor_pb2.FileDescriptorProto]:
    files = [f for f in descriptor_set.file if f.name.startswith(OUR_PREFIX)]
    assert files, "no agentcoord protos in the descriptor set"
    return files


@pytest.fixture(scope="module")
def messages(
    descriptor_set: descriptor_pb2.FileDescriptorSet,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of the set (imports included), by fully-qualified name with a leading dot."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, msgs: list[descriptor_pb2.DescriptorProto]) -> None:
        for msg in msgs:
            name = f"{prefix}.{msg.name}"
            found[name] = msg
            add(name, list(msg.nested_type))

    for f in descriptor_set.file:
        add(f".{f.package}" if f.package else "", list(f.message_type))
    return found


def _upper_snake(name: str) -> str:
    """Returns PascalCase ``name`` in UPPER_SNAKE_CASE, as Buf's ENUM_VALUE_PREFIX does."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


def _is_synthetic_oneof(msg: descriptor_pb2.DescriptorProto, index: int) -> bool:
    """Tells whether a oneof is the hidden one protoc adds for a proto3 ``optional`` field."""
    members = [f for f in msg.field if f.HasField("oneof_index") and f.oneof_index == index]
    return bool(members) and all(f.proto3_optional for f in members)


def _walk_message(
    msg: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    if msg.options.map_entry:  # generated for map<,> fields; has no source of its own
        return
    yield Element("message", name, path)
    for i, field in enumerate(msg.field):
        yield Element("field", f"{name}.{field.name}", (*path, MESSAGE_FIELD, i))
    for i, oneof in enumerate(msg.oneof_decl):
        if not _is_synthetic_oneof(msg, i):
            yield Element("oneof", f"{name}.{oneof.name}", (*path, MESSAGE_ONEOF_DECL, i))
    for i, enum in enumerate(msg.enum_type):
        yield from _walk_enum(enum, f"{name}.{enum.name}", (*path, MESSAGE_ENUM_TYPE, i))
    for i, nested in enumerate(msg.nested_type):
        yield from _walk_message(nested, f"{name}.{nested.name}", (*path, MESSAGE_NESTED_TYPE, i))


def _walk_enum(
    enum: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]
) -> Iterator[Element]:
    yield Element("enum", name, path)
    for i, value in enumerate(enum.value):
        yield Element("enum value", f"{name}.{value.name}", (*path, ENUM_VALUE, i))


def _elements(f: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    pkg = f.package
    for i, svc in enumerate(f.service):
        yield Element("service", f"{pkg}.{svc.name}", (FILE_SERVICE, i))
        for j, rpc in enumerate(svc.method):
            yield Element(
                "rpc", f"{pkg}.{svc.name}.{rpc.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)
            )
    for i, msg in enumerate(f.message_type):
        yield from _walk_message(msg, f"{pkg}.{msg.name}", (FILE_MESSAGE_TYPE, i))
    for i, enum in enumerate(f.enum_type):
        yield from _walk_enum(enum, f"{pkg}.{enum.name}", (FILE_ENUM_TYPE, i))


def _all_enums(
    f: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
    def from_message(
        msg: descriptor_pb2.DescriptorProto, prefix: str
    ) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
        name = f"{prefix}.{msg.name}"
        for enum in msg.enum_type:
            yield f"{name}.{enum.name}", enum
        for nested in msg.nested_type:
            yield from from_message(nested, name)

    for enum in f.enum_type:
        yield f"{f.package}.{enum.name}", enum
    for msg in f.message_type:
        yield from from_message(msg, f.package)


def _fail_on(problems: list[str]) -> None:
    if problems:
        pytest.fail("\n".join(["proto style violations:", *problems]), pytrace=False)


def test_all_protos_compile_and_are_ours(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    assert {f.name for f in our_files} == set(_proto_files())


def test_files_are_proto3(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    _fail_on([f"{f.name}: syntax is {f.syntax!r}" for f in our_files if f.syntax != "proto3"])


def test_package_is_versioned_and_matches_directory(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    for f in our_files:
        directory = f.name.rsplit("/", 1)[0].replace("/", ".")
        if not f.package.endswith(".v1"):
            problems.append(f"{f.name}: package {f.package!r} does not end with .v1")
        if f.package != directory:
            problems.append(
                f"{f.name}: package {f.package!r} does not match directory {directory!r}"
            )
    _fail_on(problems)


def test_services_end_with_service(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    _fail_on(
        [
            f"{f.name}: service {svc.name} does not end with 'Service'"
            for f in our_files
            for svc in f.service
            if not svc.name.endswith("Service")
        ]
    )


def test_rpcs_have_own_request_and_response(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    used: dict[str, str] = {}
    for f in our_files:
        for svc in f.service:
            for rpc in svc.method:
                where = f"{f.package}.{svc.name}.{rpc.name}"
                for role, type_name, suffix in (
                    ("request", rpc.input_type, "Request"),
                    ("response", rpc.output_type, "Response"),
                ):
                    expected = f".{f.package}.{rpc.name}{suffix}"
                    if type_name == ".google.protobuf.Empty":
                        problems.append(f"{where}: {role} is google.protobuf.Empty")
                    elif type_name != expected:
                        problems.append(f"{where}: {role} is {type_name}, expected {expected}")
                    if type_name in used:
                        problems.append(
                            f"{where}: {role} {type_name} is also used by {used[type_name]}"
                        )
                    used[type_name] = where
    _fail_on(problems)


def test_enums_have_unspecified_zero_and_prefixed_values(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    for f in our_files:
        for name, enum in _all_enums(f):
            prefix = _upper_snake(enum.name) + "_"
            if not enum.value or enum.value[0].number != 0:
                problems.append(f"{name}: first value is not 0")
            elif enum.value[0].name != f"{prefix}UNSPECIFIED":
                problems.append(
                    f"{name}: zero value {enum.value[0].name} is not {prefix}UNSPECIFIED"
                )
            problems += [
                f"{name}: value {v.name} is not prefixed with {prefix}"
                for v in enum.value
                if not v.name.startswith(prefix)
            ]
    _fail_on(problems)


def test_list_rpcs_are_paginated(
    our_files: list[descriptor_pb2.FileDescriptorProto],
    messages: dict[str, descriptor_pb2.DescriptorProto],
) -> None:
    problems = []
    for f in our_files:
        for svc in f.service:
            for rpc in svc.method:
                if not rpc.name.startswith("List"):
                    continue
                where = f"{f.package}.{svc.name}.{rpc.name}"
                request = {fd.name: fd for fd in messages[rpc.input_type].field}
                response = {fd.name: fd for fd in messages[rpc.output_type].field}
                for msg_fields, field, type_, label in (
                    (request, "page_size", FieldType.TYPE_INT32, "int32"),
                    (request, "page_token", FieldType.TYPE_STRING, "string"),
                    (response, "next_page_token", FieldType.TYPE_STRING, "string"),
                ):
                    fd = msg_fields.get(field)
                    if fd is None or fd.type != type_ or fd.label == FieldType.LABEL_REPEATED:
                        problems.append(f"{where}: needs `{label} {field}`")
                first = [fd for fd in response.values() if fd.number == 1]
                if not first or first[0].label != FieldType.LABEL_REPEATED:
                    problems.append(f"{where}: response field 1 is not the repeated results")
    _fail_on(problems)


def test_every_element_has_a_leading_comment(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    problems = []
    for f in our_files:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location
        }
        problems += [
            f"{f.name}: {el.kind} {el.name} has no leading comment"
            for el in _elements(f)
            if not comments.get(el.path)
        ]
    _fail_on(problems)


def test_brief_rpcs_exist_with_their_streaming_shape(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    services = {f"{f.package}.{svc.name}": svc for f in our_files for svc in f.service}
    problems = []
    for service_name, expected in EXPECTED_RPCS.items():
        svc = services.get(service_name)
        if svc is None:
            problems.append(f"service {service_name} is missing")
            continue
        rpcs = {rpc.name: rpc for rpc in svc.method}
        for rpc_name, (client_streaming, server_streaming) in expected.items():
            rpc = rpcs.get(rpc_name)
            if rpc is None:
                problems.append(f"{service_name}: rpc {rpc_name} is missing")
                continue
            shape = (rpc.client_streaming, rpc.server_streaming)
            if shape != (client_streaming, server_streaming):
                problems.append(
                    f"{service_name}.{rpc_name}: (client_streaming, server_streaming) is "
                    f"{shape}, expected {(client_streaming, server_streaming)}"
                )
    _fail_on(problems)


def test_upper_snake_matches_buf() -> None:
    assert _upper_snake("State") == "STATE"
    assert _upper_snake("SplitPolicy") == "SPLIT_POLICY"
    assert _upper_snake("TaskView") == "TASK_VIEW"
    assert _upper_snake("HTTPMethod") == "HTTP_METHOD"
