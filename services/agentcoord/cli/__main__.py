"""Run the CLI as ``python -m agentcoord.cli``."""

from agentcoord.cli.main import main

raise SystemExit(main())
