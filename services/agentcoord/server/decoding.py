"""Request bytes that do not decode become INVALID_ARGUMENT naming the field, not UNKNOWN.

grpc.aio decodes a unary request before any interceptor or handler runs, and an exception
there ends the call with UNKNOWN and a traceback in the log. So every method of our services
is registered with a request deserializer that never raises for a unary request: it returns
an :class:`Undecodable` marker, and the handler, called inside the interceptor, raises its
:class:`InvalidInput`. Request streams decode each message inside the handler's ``async for``,
so there the deserializer raises the :class:`InvalidInput` itself and the interceptor maps it.

Only a failed decode pays for finding the field: :func:`describe_fault` walks the wire format
against the message's descriptor and names the first field that is truncated, holds invalid
UTF-8 or nests messages deeper than protobuf allows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from agentcoord.core.errors import InvalidInput

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

MAX_DEPTH = 100
"""Deepest nesting of messages protobuf decodes (upb's default recursion limit)."""

_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_PACKABLE_VARINTS = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
    }
)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands for a unary request whose bytes did not decode."""

    error: InvalidInput
    """What to answer: the field and why."""


class _Fault(Exception):
    """The first problem found in the wire format, at ``path``."""

    def __init__(self, path: str, description: str) -> None:
        super().__init__(description)
        self.path = path
        self.description = description


def describe_fault(descriptor: Descriptor, data: bytes) -> InvalidInput:
    """Return the InvalidInput for bytes of ``descriptor`` that failed to decode.

    The field path names the innermost request field at fault; faults inside a well-known
    type (a JSON ``Value``, a ``Duration``) or a map entry name the field holding it. A fault
    outside any known field (an unknown field cut short) has the empty path: the request.
    """
    try:
        _scan(descriptor, memoryview(data), "", "", 1)
    except _Fault as fault:
        if fault.path:
            return InvalidInput(fault.path, fault.description)
        return InvalidInput(
            "", f"the request does not decode: an unknown field {fault.description}"
        )
    return InvalidInput("", "the request does not decode")


def _varint(data: memoryview, pos: int, path: str) -> tuple[int, int]:
    value = shift = 0
    for index in range(pos, min(pos + 10, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    if len(data) - pos < 10:
        raise _Fault(path, "is truncated")
    raise _Fault(path, "holds a malformed varint")


def _take(data: memoryview, pos: int, size: int, path: str) -> int:
    if size > len(data) - pos:
        raise _Fault(path, "is truncated")
    return pos + size


def _scan(
    descriptor: Descriptor | None,
    data: memoryview,
    path: str,
    fixed: str,
    depth: int,
    *,
    group: bool = False,
) -> int:
    """Walk the fields in ``data``; return where it ended (a group: at its end-group tag).

    ``path`` is the enclosing field's path; ``fixed``, when set, is the path every fault
    inside is reported at (the field holding a well-known type or map entry).
    """
    if depth > MAX_DEPTH:
        raise _Fault(fixed or path, f"nests messages deeper than {MAX_DEPTH} levels")
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos, fixed or path)
        number, wire = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number) if descriptor is not None else None
        here = fixed or (_field_path(path, field, counts) if field is not None else path)
        if number == 0 or wire > _FIXED32 or (wire == _END_GROUP and not group):
            raise _Fault(here, "has a malformed tag")
        if wire == _VARINT:
            _, pos = _varint(data, pos, here)
        elif wire == _FIXED64:
            pos = _take(data, pos, 8, here)
        elif wire == _FIXED32:
            pos = _take(data, pos, 4, here)
        elif wire == _LENGTH:
            size, pos = _varint(data, pos, here)
            end = _take(data, pos, size, here)
            _check_length_delimited(field, data[pos:end], here, fixed, depth)
            pos = end
        elif wire == _START_GROUP:
            pos += _scan(None, data[pos:], here, here, depth + 1, group=True)
            if pos >= len(data) or _varint(data, pos, here)[0] != (number << 3) | _END_GROUP:
                raise _Fault(here, "is truncated: a group does not end")
            pos = _varint(data, pos, here)[1]
        else:  # the end-group tag of the group being walked
            return start
    return pos


def _check_length_delimited(
    field: FieldDescriptor | None, chunk: memoryview, path: str, fixed: str, depth: int
) -> None:
    if field is None:
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            str(chunk, "utf-8")
        except UnicodeDecodeError:
            raise _Fault(path, "is not valid UTF-8") from None
    elif field.message_type is not None:
        inner = field.message_type
        opaque = bool(fixed) or inner.full_name.startswith("google.protobuf.") or _is_map(field)
        _scan(inner, chunk, path, path if opaque else "", depth + 1)
    elif field.is_repeated and field.type in _PACKABLE_VARINTS:
        pos = 0
        while pos < len(chunk):
            pos = _varint(chunk, pos, path)[1]


def _field_path(prefix: str, field: FieldDescriptor, counts: dict[int, int]) -> str:
    name = f"{prefix}.{field.name}" if prefix else field.name
    if not field.is_repeated or _is_map(field):
        return name
    index = counts.get(field.number, 0)
    counts[field.number] = index + 1
    return f"{name}[{index}]"


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _deserializer(descriptor: Descriptor, streaming: bool) -> Callable[[bytes], Any]:
    parse = message_factory.GetMessageClass(descriptor).FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            error = describe_fault(descriptor, data)
            if streaming:
                raise error from None
            return Undecodable(error)

    return deserialize


def _refusing(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: Any) -> Any:
        if type(request) is Undecodable:
            raise request.error
        return await behavior(request, context)

    return unary


def _refusing_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def stream(request: Any, context: Any) -> Any:
        if type(request) is Undecodable:
            raise request.error
        async for response in behavior(request, context):
            yield response

    return stream


def guard(handler: Handler, descriptor: Descriptor) -> Handler:
    """Return ``handler`` with a request deserializer that answers bad bytes cleanly."""
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _refusing(handler.unary_unary), _deserializer(descriptor, False), serialize
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _refusing_stream(handler.unary_stream), _deserializer(descriptor, False), serialize
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary, _deserializer(descriptor, True), serialize
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        handler.stream_stream, _deserializer(descriptor, True), serialize
    )


class GuardedRegistration:
    """Stands in for the server when a generated ``add_*Servicer_to_server`` registers.

    Every method handler it is given is registered with :func:`guard` applied.
    """

    def __init__(self, server: grpc.aio.Server, service: ServiceDescriptor) -> None:
        """Register on ``server`` the methods of ``service``."""
        self._server = server
        self._inputs = {method.name: method.input_type for method in service.methods}
        self._prefix = f"/{service.full_name}/"

    def _guarded(self, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
        return {name: guard(handler, self._inputs[name]) for name, handler in handlers.items()}

    def add_registered_method_handlers(
        self, service_name: str, handlers: Mapping[str, Handler]
    ) -> None:
        """Register ``handlers`` (by method name), guarded."""
        self._server.add_registered_method_handlers(service_name, self._guarded(handlers))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Register generic handlers; each method they serve is guarded."""
        self._server.add_generic_rpc_handlers([_GuardedGeneric(self, h) for h in handlers])

    def input_of(self, method: str) -> Descriptor | None:
        """Return the request type of the full method name ``method``, if it is the service's."""
        return self._inputs.get(method.removeprefix(self._prefix))


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are guarded, each built once."""

    def __init__(self, registration: GuardedRegistration, inner: grpc.GenericRpcHandler) -> None:
        self._registration = registration
        self._inner = inner
        self._built: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        built = self._built.get(method)
        if built is None:
            handler = self._inner.service(handler_call_details)
            descriptor = self._registration.input_of(method)
            if handler is None or descriptor is None:  # not ours: callers choose the names
                return handler
            built = self._built[method] = guard(handler, descriptor)
        return built
