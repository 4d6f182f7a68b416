"""The docs stay true to the code.

- docs/errors.md: its table matches ``STATUS_BY_ERROR`` row for row, and its reasons match the
  reasons the code raises.
- docs/operations.md: its configuration table matches ``ServerConfig`` field for field (flag,
  environment variable and default), and the metadata and grpc options it names are the code's.
- README.md (and docs/operations.md): every grpcurl command works as written against a real
  server, run with the real ``grpcurl`` (the ``grpcurl_path`` fixture of ``tests/conftest.py``;
  the stand-in ``tests/grpcurl_standin.py`` only where no real one is installed: the test
  report's header says which ran); every ``agentcoord serve`` line parses.
- Relative links in README.md and docs/ point at files that exist.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool, json_format

from agentcoord.client._client import SERVER_VARIABLE
from agentcoord.core import errors as domain_errors
from agentcoord.discovery.v1 import discovery_service_pb2 as discovery_pb
from agentcoord.server import auth
from agentcoord.server import config as server_config
from agentcoord.server.app import KEEPALIVE_OPTIONS, start_app
from agentcoord.server.config import ServerConfig
from agentcoord.server.errors import STATUS_BY_ERROR
from agentcoord.store.postgres import store as postgres_store
from agentcoord.store.sqlite import store as sqlite_store
from tests.helpers import SERVED_SERVICES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ERRORS_MD = DOCS / "errors.md"
OPERATIONS_MD = DOCS / "operations.md"
SERVICES = ROOT / "services" / "agentcoord"
DEFAULT_ADDRESS = re.compile(r"\b(?:127\.0\.0\.1|localhost):50051\b")


# --- markdown helpers ---------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """Return the text under the heading ``heading``, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert match, f"no section {heading!r}"
    end = re.compile(r"^#+ ", re.MULTILINE).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """Return the cells of every markdown table row in ``text``, header and rule excluded."""
    rows = []
    lines = text.splitlines()
    lines = [line.strip() for line in lines]  # tables may be indented inside a list item
    for index, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        is_rule = re.fullmatch(r"\|[-:| ]+\|", line.strip())
        next_is_rule = index + 1 < len(lines) and re.fullmatch(
            r"\|[-:| ]+\|", lines[index + 1].strip()
        )
        if is_rule or next_is_rule:
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def shell_commands(text: str) -> list[str]:
    """Return the commands of the ``sh`` code blocks of ``text``, one per logical line."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


# --- docs/errors.md -----------------------------------------------------------------------------


def documented_errors() -> dict[str, tuple[str, set[str]]]:
    """Domain error class name -> (gRPC code, reasons), from the table in docs/errors.md."""
    rows = {}
    for cells in table_rows(section(ERRORS_MD.read_text(), "The table")):
        (name,), (code,) = code_spans(cells[0]), code_spans(cells[1])
        assert name not in rows, f"docs/errors.md lists {name} twice"
        rows[name] = (code, set(code_spans(cells[2])))
    return rows


def domain_error_classes() -> dict[str, type[domain_errors.AgentcoordError]]:
    return {
        name: value
        for name, value in vars(domain_errors).items()
        if isinstance(value, type) and issubclass(value, domain_errors.AgentcoordError)
    }


def raised_reasons() -> dict[str, set[str]]:
    """Domain error class name -> the reasons its constructions in services/ give it.

    ``reason="X"`` counts as X; no ``reason`` argument counts as the class's default reason;
    a conditional between literals counts as both; a computed reason (``reason=error.reason``)
    is not a construction of a new reason.
    """
    classes = domain_error_classes()
    found: dict[str, set[str]] = {}
    for path in SERVICES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in classes:
                continue
            reason = next((k.value for k in node.keywords if k.arg == "reason"), None)
            if reason is None:
                found.setdefault(name, set()).add(classes[name].default_reason)
            else:
                # A literal, or a conditional choosing between literals, names new reasons.
                branches = (
                    [reason.body, reason.orelse] if isinstance(reason, ast.IfExp) else [reason]
                )
                for branch in branches:
                    if isinstance(branch, ast.Constant) and isinstance(branch.value, str):
                        found.setdefault(name, set()).add(branch.value)
    return found


def test_errors_table_matches_status_by_error() -> None:
    documented = documented_errors()
    in_code = {cls.__name__: code.name for cls, code in STATUS_BY_ERROR.items()}
    assert set(documented) == set(in_code), (
        f"only in docs/errors.md: {sorted(set(documented) - set(in_code))}; "
        f"only in STATUS_BY_ERROR: {sorted(set(in_code) - set(documented))}"
    )
    wrong = {
        name: (code, in_code[name])
        for name, (code, _) in documented.items()
        if code != in_code[name]
    }
    assert not wrong, f"documented code != code in STATUS_BY_ERROR: {wrong}"
    for name in documented:
        assert isinstance(getattr(domain_errors, name, None), type), f"no core.errors.{name}"


def test_errors_reasons_match_the_code() -> None:
    documented = documented_errors()
    raised = raised_reasons()
    for name, (_, reasons) in documented.items():
        default = getattr(domain_errors, name).default_reason
        in_code = raised.get(name) or {default}  # never raised yet: its default is documented
        assert reasons == in_code, (
            f"docs/errors.md gives {name} the reasons {sorted(reasons)}, "
            f"the code raises it with {sorted(in_code)}"
        )
    unlisted = set(raised) - set(documented)
    assert not unlisted, f"raised but missing from the table in docs/errors.md: {unlisted}"


def test_errors_lists_every_kind_of_store_failure() -> None:
    # STORE_UNAVAILABLE carries the kind in its metadata; clients and operators read it there.
    kinds = {
        *sqlite_store._FAILURES.values(),
        *postgres_store._FAILURE_CLASSES.values(),
        *postgres_store._FAILURE_STATES.values(),
    }
    for path in (ERRORS_MD, OPERATIONS_MD):
        missing = sorted(kind for kind in kinds if f"`{kind}`" not in path.read_text())
        assert not missing, f"{path.name} does not name the store failure kinds {missing}"


# --- docs/operations.md -------------------------------------------------------------------------


def env_name(field_name: str) -> str:
    return "AGENTCOORD_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentcoord serve", exit_on_error=False)
    server_config.add_arguments(parser)
    return parser


def config_rows() -> list[list[str]]:
    return table_rows(section(OPERATIONS_MD.read_text(), "Configuration"))


def test_operations_documents_every_config_field_and_nothing_else() -> None:
    documented: dict[str, tuple[str, str]] = {}
    for cells in config_rows():
        flags = [span for span in code_spans(cells[0]) if span.startswith("--")]
        envs = [span for span in code_spans(cells[1]) if span.startswith("AGENTCOORD_")]
        assert len(envs) == 1, f"row {cells} needs exactly one AGENTCOORD_ variable"
        documented[envs[0]] = (flags[0] if flags else "", cells[2])
    fields = {env_name(spec.name): spec for spec in dataclasses.fields(ServerConfig)}
    assert set(documented) == set(fields), (
        f"only in docs/operations.md: {sorted(set(documented) - set(fields))}; "
        f"undocumented ServerConfig fields: {sorted(set(fields) - set(documented))}"
    )
    parser_flags = set(serve_parser()._option_string_actions)
    defaults = ServerConfig()
    for env, (flag, default_cell) in documented.items():
        spec = fields[env]
        if spec.name == "services":
            assert not flag, "services are positional arguments, not a flag"
            continue
        assert flag == flag_name(spec.name), f"{env}: documented flag {flag!r}"
        assert flag in parser_flags, f"agentcoord serve has no {flag}"
        (shown,) = code_spans(default_cell) or [default_cell]
        assert parses_as(shown, getattr(defaults, spec.name)), (
            f"{flag}: docs/operations.md says the default is {shown!r}, "
            f"ServerConfig says {getattr(defaults, spec.name)!r}"
        )


def parses_as(shown: str, default: Any) -> bool:
    if isinstance(default, bool):
        return shown == str(default).lower()
    if isinstance(default, float):  # a duration: 10s, 5m, 7d
        return server_config.parse_duration(shown) == default
    if isinstance(default, int):
        return float(shown.replace("_", "").replace(",", "")) == default
    return (shown if shown != '""' else "") == default


def test_operations_mentions_only_real_flags_and_variables() -> None:
    text = OPERATIONS_MD.read_text() + README.read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    known_flags = set(serve_parser()._option_string_actions)
    assert flags - known_flags == set(), f"not flags of agentcoord serve: {flags - known_flags}"
    variables = set(re.findall(r"\bAGENTCOORD_[A-Z_]+\b", text))
    known = {env_name(spec.name) for spec in dataclasses.fields(ServerConfig)}
    known.add(SERVER_VARIABLE)  # the clients' (Several replicas)
    assert variables - known == set(), f"unknown environment variables: {variables - known}"


def test_documented_serve_commands_parse() -> None:
    for path in (README, OPERATIONS_MD):
        for command in shell_commands(path.read_text()):
            words = shlex.split(command, comments=True)
            if "serve" not in words or not any(w.endswith("agentcoord") for w in words):
                continue
            argv = words[words.index("serve") + 1 :]
            argv = [os.path.expandvars(word) for word in argv]
            try:
                args = serve_parser().parse_args(argv)
            except (argparse.ArgumentError, SystemExit) as error:
                raise AssertionError(f"{path.name}: {command!r} does not parse: {error}") from None
            config = server_config.from_sources(args, environ={})
            assert config.listen, command


def test_operations_names_the_metadata_and_grpc_options() -> None:
    text = OPERATIONS_MD.read_text()
    assert f"`{auth.JOIN_TOKEN_HEADER}`" in text
    assert "`authorization`" in text
    options = {
        code_spans(cells[0])[0]: code_spans(cells[1])[0]
        for cells in table_rows(section(text, "Many streams"))
    }
    for name, value in KEEPALIVE_OPTIONS:
        assert options.get(name) == str(value), f"document {name} = {value} in operations.md"
    for name in ("grpc.server.max_pending_requests", "grpc.server.max_pending_requests_hard_limit"):
        assert f"`{name}`" in text


# --- links --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_resolve(path: Path) -> None:
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target:
            continue
        if not (path.parent / target).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


# --- grpcurl commands ---------------------------------------------------------------------------


@dataclass
class Walkthrough:
    """What the commands run so far have done, to check each output against."""

    live: dict[str, discovery_pb.RegisterRequest] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)


def grpcurl_args(command: str) -> list[str]:
    """The arguments of the grpcurl call in ``command`` (which may be ``X=$(grpcurl ...)``)."""
    inner = re.sub(r"^[A-Z_]+=\$\(", "", command).split(" | ")[0]
    words = shlex.split(inner)
    return words[words.index("grpcurl") + 1 :]


def request_of(args: list[str]) -> dict[str, Any]:
    return json.loads(args[args.index("-d") + 1]) if "-d" in args else {}


def positionals(args: list[str]) -> list[str]:
    """grpcurl's positional arguments: address, then ``list``/``describe``/method, then symbol."""
    found, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-d", "-H"):
            skip = True
        elif not arg.startswith("-"):
            found.append(arg)
    return found


def parse_register(body: dict[str, Any]) -> discovery_pb.RegisterRequest:
    return json_format.ParseDict(body, discovery_pb.RegisterRequest())


def describe_names(symbol: str) -> list[str]:
    """Names a describe of ``symbol`` shows, from the generated descriptors.

    A message's fields, a service's methods, or a method's name and its request and response.
    """
    pool = descriptor_pool.Default()
    with contextlib.suppress(KeyError):
        return [f.name for f in pool.FindMessageTypeByName(symbol).fields]
    with contextlib.suppress(KeyError):
        return [m.name for m in pool.FindServiceByName(symbol).methods]
    method = pool.FindMethodByName(symbol)
    return [f"rpc {method.name}", method.input_type.full_name, method.output_type.full_name]


def check_output(args: list[str], output: str, state: Walkthrough) -> None:
    """Assert the key facts of one command's output; an unknown command fails loudly."""
    words = positionals(args)
    verb = words[1]
    if verb == "list":
        assert set(output.split()) >= SERVED_SERVICES, output
        return
    if verb == "describe":
        symbol = words[2]
        assert output.startswith(f"{symbol} is a "), output
        for name in describe_names(symbol):
            assert name in output, f"describe {symbol} lacks {name}:\n{output}"
        return
    method = verb.rpartition("/")[2]
    body = request_of(args)
    responses = list(json_values(output))
    assert len(responses) == 1, f"{method}: expected one response message:\n{output}"
    response = responses[0]
    if method == "Check":
        assert response == {"status": "SERVING"}, output
    elif method == "Register":
        request = parse_register(body)
        assert response["agent"]["agentId"] == request.agent_id, output
        assert response["agent"]["state"] == "STATE_LIVE", output
        assert response["sessionToken"], output
        state.live[request.agent_id] = request
    elif method == "ListAgents":
        wanted, role = set(body.get("capabilities", [])), body.get("role", "")
        expected = {
            agent_id
            for agent_id, request in state.live.items()
            if wanted <= set(request.capabilities) and role in ("", request.role)
        }
        listed = {agent["agentId"] for agent in response.get("agents", [])}
        assert expected, "register an agent with these capabilities before listing them"
        assert listed == expected, f"expected {sorted(expected)}:\n{output}"
    elif method == "GetAgent":
        agent, agent_id = response["agent"], body["agent_id"]
        assert agent["agentId"] == agent_id and agent["state"] == "STATE_LIVE", output
        assert agent["capabilities"] == sorted(state.live[agent_id].capabilities), output
    elif method == "GetSummary":
        live = len(state.live)
        assert response.get("liveAgents", 0) == live, output
        assert response.get("canCoordinate", False) == (live >= 2), output
    elif method == "Heartbeat":
        assert response["ttlRemaining"] and response["epoch"], output
        assert "command" not in response, f"the session should be current:\n{output}"
    elif method == "Deregister":
        assert response["agent"]["state"] == "STATE_LEFT", output
        state.live.pop(body["agent_id"])
    else:
        raise AssertionError(f"no check for the documented command {' '.join(args)!r}: add one")


def json_values(output: str) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(output) and output[position].isspace():
            position += 1
        if position == len(output):
            return
        value, position = decoder.raw_decode(output, position)
        yield value


def documented_grpcurl_commands(text: str) -> list[str]:
    return [command for command in shell_commands(text) if "grpcurl" in command]


def test_readme_shows_the_required_calls() -> None:
    commands = documented_grpcurl_commands(README.read_text())
    joined = "\n".join(commands)
    for needle in (
        " list",
        "grpc.health.v1.Health/Check",
        "DiscoveryService/Register",
        "DiscoveryService/GetSummary",
        "DiscoveryService/GetAgent",
    ):
        assert needle in joined, f"README.md shows no grpcurl call for {needle.strip()}"
    filtered = [c for c in commands if "ListAgents" in c and "capabilities" in c]
    assert filtered, "README.md shows no ListAgents call with a capability filter"


async def run_shell(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f"set -euo pipefail\n{script}",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_documented_grpcurl_commands_work_as_written(
    grpcurl_path: str, tmp_path: Path
) -> None:
    app = await start_app(ServerConfig(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path}/t.db"))
    try:
        state = Walkthrough()
        readme = documented_grpcurl_commands(README.read_text())
        # operations.md's commands that need no secrets run against the same server.
        operations = [
            c
            for c in documented_grpcurl_commands(OPERATIONS_MD.read_text())
            if "$" not in c and "-plaintext" in c
        ]
        for command in [*readme, *operations]:
            local = DEFAULT_ADDRESS.sub(f"127.0.0.1:{app.port}", command)
            env = {**os.environ, "PATH": grpcurl_path, **state.variables}
            assignment = re.match(r"^([A-Z_]+)=\$\(", command)
            if assignment:  # run it, then print the variable it set, for the later commands
                local += f'\nprintf %s "${assignment.group(1)}"'
            code, stdout, stderr = await run_shell(local, env)
            assert code == 0, f"{command!r} exited {code}:\n{stdout}{stderr}"
            args = grpcurl_args(command)
            if assignment:
                assert stdout.strip(), f"{command!r} set {assignment.group(1)} to nothing"
                state.variables[assignment.group(1)] = stdout.strip()
                request = parse_register(request_of(args))
                assert "Register" in command, "only Register output is captured in a variable"
                state.live[request.agent_id] = request
                continue
            check_output(args, stdout, state)
    finally:
        await app.stop(0)
