"""Pure domain core: the rules of agents, tasks, leases and state; no gRPC and no SQL."""
