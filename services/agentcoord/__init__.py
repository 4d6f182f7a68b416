"""agentcoord: gRPC services that let many agents cooperate."""

__version__ = "0.1.0"

__all__ = ["__version__"]
