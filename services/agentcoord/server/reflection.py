"""Server reflection that every client can use: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection's servicer does the protocol; this module closes three gaps in it:

- It serves only ``grpc.reflection.v1alpha``. ``v1`` has the same messages under another
  package, so the same servicer also answers ``grpc.reflection.v1`` (descriptors for it are
  derived from the ``v1alpha`` file).
- A method symbol (``pkg.Service.Method``) answers NOT_FOUND: the upb descriptor pool's
  ``FindFileContainingSymbol`` does not resolve methods. Here a method resolves to its service's
  file, and an enum value named inside its enum (``pkg.Enum.VALUE``, as grpcurl asks) to its
  enum's; services, messages, enums, enum values (``pkg.VALUE``) and fields resolve as before.
- The descriptors compiled into generated code carry no ``json_name``, so clients that read it
  from reflection (grpcurl 1.8) would print ``session_token`` instead of the documented
  ``sessionToken``. The served files, and every file they import, get ``json_name`` filled in
  with the name protobuf computes (lowerCamelCase). So do the ``google.rpc`` error details,
  served too so that clients can decode an error's ``ErrorInfo`` and ``BadRequest``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (their messages are served)
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME
"""``grpc.reflection.v1alpha.ServerReflection``."""
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
"""``grpc.reflection.v1.ServerReflection``, the same protocol as v1alpha under its final name."""

ERROR_DETAILS = ("google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.BadRequest")
"""Messages of error details, served so that clients can decode ``grpc-status-details-bin``."""

_V1ALPHA_PACKAGE = V1ALPHA_SERVICE.rpartition(".")[0]
_V1_PACKAGE = V1_SERVICE.rpartition(".")[0]
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _fill_json_names(
    messages: Iterable[descriptor_pb2.DescriptorProto],
    descriptors: Mapping[str, descriptor.Descriptor],
) -> None:
    """Copy each field's ``json_name`` from its descriptor into ``messages``, nested ones too."""
    for message in messages:
        found = descriptors[message.name]
        for field in message.field:
            field.json_name = found.fields_by_name[field.name].json_name
        for extension in message.extension:
            extension.json_name = found.extensions_by_name[extension.name].json_name
        _fill_json_names(message.nested_type, found.nested_types_by_name)


def _file_proto(file: descriptor.FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    """``file`` as a FileDescriptorProto, with ``json_name`` set on every field."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    _fill_json_names(proto.message_type, file.message_types_by_name)
    for extension in proto.extension:
        extension.json_name = file.extensions_by_name[extension.name].json_name
    return proto


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, derived from the v1alpha file it renames."""
    proto = _file_proto(descriptor_pool.Default().FindServiceByName(V1ALPHA_SERVICE).file)
    proto.name, proto.package = _V1_FILE, _V1_PACKAGE
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new, 1)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    return proto


def _served_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool of the files declaring ``service_names``, the reflection services and error details.

    Files are copied from the default pool with their imports and ``json_name`` filled in.
    """
    source = descriptor_pool.Default()
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(_file_proto(file).SerializeToString())
        added.add(file.name)

    for name in [*service_names, V1ALPHA_SERVICE]:
        add(source.FindServiceByName(name).file)
    for detail in ERROR_DETAILS:
        add(source.FindMessageTypeByName(detail).file)
    pool.AddSerializedFile(_v1_file().SerializeToString())
    return pool


class _ReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer over :func:`_served_pool`, resolving method symbols too."""

    def __init__(self, service_names: Iterable[str]) -> None:
        names = list(service_names)
        self._served = _served_pool(names)
        super().__init__([*names, V1ALPHA_SERVICE, V1_SERVICE], pool=self._served)

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        """Answer with the file declaring the symbol (see :meth:`_resolvable`)."""
        symbol = self._resolvable(fully_qualified_name)
        answer: reflection_pb2.ServerReflectionResponse = (
            super()._file_containing_symbol(request, symbol)  # type: ignore[misc]
        )
        return answer

    def _resolvable(self, symbol: str) -> str:
        """A symbol declared in the same file as ``symbol`` that the pool can look up.

        A method becomes its service. An enum value named inside its enum
        (``pkg.Enum.VALUE``, as grpcurl 1.8 names it) becomes the enum; protobuf's own name
        for it (``pkg.VALUE``, a sibling of the enum) already resolves.
        """
        with contextlib.suppress(KeyError):
            return self._served.FindMethodByName(symbol).containing_service.full_name
        parent, _, name = symbol.rpartition(".")
        with contextlib.suppress(KeyError):
            if name in self._served.FindEnumTypeByName(parent).values_by_name:
                return parent
        return symbol


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) for ``service_names`` on ``server``."""
    servicer = _ReflectionServicer(service_names)
    # v1 and v1alpha messages are the same on the wire: the v1alpha classes encode both.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in (V1ALPHA_SERVICE, V1_SERVICE)
        ]
    )
