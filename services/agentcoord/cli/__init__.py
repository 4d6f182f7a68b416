"""The ``agentcoord`` command line."""
