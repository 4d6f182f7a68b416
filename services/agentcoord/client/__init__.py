"""Python client for agentcoord: typed async methods over the generated stubs."""

from agentcoord.client._client import (
    AgentcoordClient,
    DiscoveryClient,
    DistributionClient,
    StateSyncClient,
)
from agentcoord.client._errors import RPCError
from agentcoord.client._retry import RetryPolicy

__all__ = [
    "AgentcoordClient",
    "DiscoveryClient",
    "DistributionClient",
    "RPCError",
    "RetryPolicy",
    "StateSyncClient",
]
