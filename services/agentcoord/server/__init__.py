"""The gRPC server: thin servicers over the core, and the process that hosts them."""
