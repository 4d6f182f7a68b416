"""Property-based fuzz test of every RPC of every service against a real server.

For each RPC (from the service descriptors), Hypothesis generates calls with live and
bad credentials and requests built from the input message's descriptor: seeded real
values, plausible ones and hostile ones (see ``strategies.py``). Each call must end in a
status the contract names: never UNKNOWN or INTERNAL, never a hang past the call
deadline, never an error or traceback in the server log, and the server must still
answer its health check afterwards. A failing call is shrunk to a minimal request and
reported with the server's traceback.

The server, the examples per RPC and the seed are in ``conftest.py``; see
docs/development.md.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import given

from tests.fuzz.conftest import Target, check_call, fuzzing
from tests.fuzz.harness import METHODS, Call, calls, method_path


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.full_name)
def test_no_request_breaks_the_server(target: Target, method: MethodDescriptor) -> None:
    assert method_path(method)  # every RPC of every service is a case of its own

    @fuzzing(target.examples)
    @given(calls(target.requests, method))
    def fuzz(call: Call) -> None:
        check_call(target, call)

    fuzz()
