"""Proto ⇄ core translation: the only place both worlds meet.

One module per service (:mod:`.discovery`, :mod:`.statesync`, :mod:`.distribution`), each
with its enum maps and its records' wire forms, over :mod:`.wire` (times, durations and
JSON values, shared by all). Handlers validate requests and call the core; what crosses
between a message and a core record is written here.
"""
