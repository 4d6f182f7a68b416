"""The ``agentcoord`` command line."""

import os

# grpc's C core writes its own log lines to stderr (such as a second, multi-line report of a
# port that is in use, which the command already reports in one line). It reads
# GRPC_VERBOSITY once, when grpc is imported, so it is set here, before anything imports
# grpc; set GRPC_VERBOSITY (and GRPC_TRACE) yourself to see the C core's logs.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
