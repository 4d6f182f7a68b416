"""Loading the AUTO splitter named by ``--splitter``: ``builtin`` or ``module:attribute``."""

from __future__ import annotations

import importlib
from typing import cast

from agentcoord.core.errors import InvalidInput
from agentcoord.core.splitter import BuiltinSplitter, Splitter


def load_splitter(name: str) -> Splitter:
    """Return the splitter ``name`` designates.

    ``module:attribute`` names a class or zero-argument factory returning an object with
    a ``name`` and a ``split(spec) -> Plan`` method; it is imported now, at start.

    Raises:
        InvalidInput: the name does not import, or does not give a splitter (field ``splitter``).
    """
    if name == "builtin":
        return BuiltinSplitter()
    module_name, sep, attribute = name.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidInput("splitter", f"{name!r} is neither 'builtin' nor 'module:attribute'")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput("splitter", f"cannot load {name!r}: {exc}") from None
    splitter = factory()
    if not callable(getattr(splitter, "split", None)) or not isinstance(
        getattr(splitter, "name", None), str
    ):
        raise InvalidInput("splitter", f"{name!r} gave {splitter!r}, which has no name and split()")
    return cast(Splitter, splitter)
