"""Services whose contracts exist but whose behaviour lands later: they answer UNIMPLEMENTED."""

from __future__ import annotations

from agentcoord.distribution.v1 import distribution_service_pb2 as distribution_pb
from agentcoord.distribution.v1 import distribution_service_pb2_grpc as distribution_pb_grpc

DISTRIBUTION_SERVICE = distribution_pb.DESCRIPTOR.services_by_name["DistributionService"]
"""Descriptor of DistributionService."""


class DistributionServicer(distribution_pb_grpc.DistributionServiceServicer):
    """Answers every DistributionService RPC with UNIMPLEMENTED until issue 4 lands."""
