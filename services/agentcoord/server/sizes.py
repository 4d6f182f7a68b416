"""Response sizes: every List page and stream message stays under the max message size.

Responses are cut by size as well as by count. A response holds items while their
encoded sizes add up to at most its *budget* (:func:`budget`: half the server's max
message size, leaving room for the response's other fields), and always at least one
item. The field limits bound every item well below the max message size (docs/operations.md,
"Message sizes"), so a single item that exceeds the budget still fits alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

MIN_MAX_MESSAGE_BYTES = 4 << 20
"""Smallest max message size a server may be configured with: the largest item (a task
or a sub-task at its field limits) must fit one message."""
ITEM_OVERHEAD = 6
"""Bytes a repeated message field adds per item (tag and length) at most."""


def budget(max_message_bytes: int) -> int:
    """Return the bytes of items one response may hold for a max message size."""
    return max_message_bytes // 2


def item_size(message: Message) -> int:
    """Return the bytes ``message`` adds as one item of a repeated field."""
    return message.ByteSize() + ITEM_OVERHEAD


def fitting(messages: Sequence[Message], max_bytes: int, *, at_least: int = 1) -> int:
    """Return how many leading ``messages`` fit in ``max_bytes`` (never fewer than ``at_least``)."""
    return fitting_sizes([item_size(message) for message in messages], max_bytes, at_least=at_least)


def fitting_sizes(sizes: Sequence[int], max_bytes: int, *, at_least: int = 1) -> int:
    """Return how many leading items of these :func:`item_size` sizes fit in ``max_bytes``."""
    total = 0
    for index, size in enumerate(sizes):
        total += size
        if total > max_bytes and index >= at_least:
            return index
    return len(sizes)


def chunks_by_size(messages: Sequence[M], max_bytes: int) -> Iterator[Sequence[M]]:
    """Split ``messages`` into runs that each fit in ``max_bytes`` (one message at least)."""
    start = 0
    while start < len(messages):
        count = fitting(messages[start:], max_bytes)
        yield messages[start : start + count]
        start += count


def revision_chunks(
    items: Sequence[M], revision: int, max_bytes: int
) -> Iterator[tuple[Sequence[M], int]]:
    """Split one watch batch by size into (items, revision) messages.

    Each message but the last resumes after its own last item (its ``revision``); the last
    carries the batch's revision. An empty batch is one empty message.
    """
    chunks = list(chunks_by_size(items, max_bytes)) or [items]
    for index, chunk in enumerate(chunks):
        last = index == len(chunks) - 1
        yield chunk, revision if last else chunk[-1].revision  # type: ignore[attr-defined]
