"""Services whose contracts exist but whose behaviour lands later: they answer UNIMPLEMENTED."""

from __future__ import annotations

from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as distribution_pb_grpc
from agentcoord.statesync.v1 import statesync_service_pb2 as statesync_pb
from agentcoord.statesync.v1 import statesync_service_pb2_grpc as statesync_pb_grpc

DISTRIBUTION_SERVICE = distribution_pb.DESCRIPTOR.services_by_name["DistributionService"]
"""Descriptor of DistributionService."""
STATESYNC_SERVICE = statesync_pb.DESCRIPTOR.services_by_name["StateSyncService"]
"""Descriptor of StateSyncService."""


class DistributionServicer(distribution_pb_grpc.DistributionServiceServicer):
    """Answers every DistributionService RPC with UNIMPLEMENTED until issue 4 lands."""


class StateSyncServicer(statesync_pb_grpc.StateSyncServiceServicer):
    """Answers every StateSyncService RPC with UNIMPLEMENTED until issue 3 lands."""
