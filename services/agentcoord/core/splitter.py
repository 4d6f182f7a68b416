"""The AUTO splitter of Distribution: a task description becomes sub-tasks with dependencies.

:class:`BuiltinSplitter` reads the Markdown structure of a description (headings,
checklists, bulleted and numbered lists, ``Step N:`` lines) and, when there is none, the
ordering words of its prose ("then", "after that", "finally") and the pattern
``X for each of A, B and C``. Sub-tasks come out in document order, which is a topological
order: a sub-task only ever depends on earlier ones. ``docs/splitting.md`` gives the rules
with examples. Another planner plugs in through the :class:`Splitter` protocol.

The splitter is pure: the same spec always gives an equal plan.
"""

from __future__ import annotations

import enum
import re
import textwrap
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeAlias, runtime_checkable

from agentcoord.core.tasks import Plan, SubtaskSpec, TaskSpec

MAX_SUBTASKS = 1000
"""Most sub-tasks in a plan; the last one merges whatever lies beyond."""
MAX_TITLE_LENGTH = 256
"""Longest sub-task title."""

_MAX_CAPABILITY_LENGTH = 64
_MAX_ENUMERATED_WORDS = 6
_QUOTED_TITLE_LENGTH = 60
_NESTING_INDENT = 2
"""Spaces that put a line under the list item above it."""


@runtime_checkable
class Splitter(Protocol):
    """Turns a task's description into sub-tasks with dependencies."""

    name: str
    """Name recorded in :attr:`Plan.splitter`."""

    def split(self, spec: TaskSpec) -> Plan:
        """Return the plan of ``spec``; the same spec must give an equal plan.

        Args:
            spec: The task to split.

        Returns:
            The sub-tasks in topological order, whether two of them can run at the same
            time, and why the task was split this way.
        """
        ...


class BuiltinSplitter:
    """The rule-based splitter of SPLIT_POLICY_AUTO (rules in docs/splitting.md)."""

    name: str = "builtin"

    def split(self, spec: TaskSpec) -> Plan:
        """Split ``spec.description`` into sub-tasks; never returns zero sub-tasks.

        Args:
            spec: The task to split.

        Returns:
            Sub-tasks ``step-1``, ``step-2``, ... in topological order, or the single
            sub-task ``main`` when the description has fewer than two recognisable items.
        """
        description = spec.description.strip()
        if not description:
            return self._single(spec, "One sub-task: the description is empty.")
        root = _read_structure(description)
        if root is None:
            return self._single(
                spec, "One sub-task: the description has no list, headings or ordering words."
            )
        leaves = _place(root)
        if len(leaves) < 2:
            return self._single(spec, "One sub-task: the description has only one item.")
        return _plan(leaves, self.name)

    def _single(self, spec: TaskSpec, reason: str) -> Plan:
        title = _shorten(spec.title.strip()) or _title(spec.description) or "Task"
        subtask = SubtaskSpec(
            local_id="main",
            title=title,
            description=spec.description,
            required_capabilities=_capabilities(spec.description),
        )
        return Plan(False, reason, (subtask,), splitter=self.name)


# --- what the parts of a description are -------------------------------------------------------


class _Kind(enum.Enum):
    """What a sub-task was made from; the value names it in the reason."""

    CHECKLIST_ITEM = "checklist item"
    BULLETED_ITEM = "bulleted item"
    NUMBERED_STEP = "numbered step"
    SECTION = "section"
    PARAGRAPH = "paragraph"
    PROSE_STEP = "step of the text"
    ENUMERATED_ITEM = "item of a 'for each' list"


class _Order(enum.Enum):
    """What a unit's own words say about when it runs."""

    DEFAULT = "default"
    """Nothing: the group decides (in order, or independent)."""
    AFTER = "after"
    """After the previous unit, or after the one it names."""
    WITH = "with"
    """At the same time as the previous unit (or the one it names)."""
    FAN_IN = "fan_in"
    """After every earlier unit of its group."""


@dataclass(frozen=True, slots=True)
class _Cue:
    """The ordering words found at the head of a unit."""

    order: _Order = _Order.DEFAULT
    steps: tuple[int, ...] = ()
    """Step numbers it names ("after step 2")."""
    subject: str = ""
    """Words naming what it waits for ("once the migration is done")."""


@dataclass(frozen=True, slots=True)
class _Unit:
    """A leaf (one sub-task, ``kind`` set) or a group of units (``kind`` None)."""

    title: str
    text: str
    cue: _Cue = _Cue()
    label: int | None = None
    """Its number in a numbered list or heading, for "after step N"."""
    kind: _Kind | None = None
    capabilities: tuple[str, ...] = ()
    """Capabilities tagged on it; a group's apply to all its leaves."""
    children: tuple[_Unit, ...] = ()
    sequential: bool = False
    """Whether a group's children run one after another unless their words say otherwise."""


def _group(children: Iterable[_Unit], sequential: bool) -> _Unit:
    kept = tuple(child for child in children if _count_leaves(child))
    return _Unit(title="", text="", children=kept, sequential=sequential)


def _count_leaves(unit: _Unit) -> int:
    if unit.kind is not None:
        return 1
    return sum(_count_leaves(child) for child in unit.children)


# --- inline text -------------------------------------------------------------------------------

_TAG = re.compile(
    r"[\[(]\s*(?:capabilit(?:y|ies)|needs|requires)\s*:\s*(?P<names>[^\])\n]*)[\])]", re.I
)
_EMPHASIS = re.compile(r"\*\*|__|`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[*_`]?[A-Z0-9])")
_LEADING_CONNECTOR = re.compile(
    r"^(?:(?:and|then|next|now|finally|lastly|after that|afterwards?|subsequently"
    r"|first(?:ly)?|to start)\b[,:]?\s*)+",
    re.I,
)


def _capabilities(text: str) -> tuple[str, ...]:
    """Capabilities named by ``[capability: x]`` or ``(needs: x, y)`` tags in ``text``."""
    names = set()
    for tag in _TAG.finditer(text):
        for raw in tag["names"].split(","):
            name = re.sub(r"\s+", "-", raw.strip().lower())
            name = re.sub(r"[^a-z0-9_.:-]", "", name)[:_MAX_CAPABILITY_LENGTH]
            if name:
                names.add(name)
    return tuple(sorted(names))


def _merged(first: Iterable[str], second: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({*first, *second}))


def _sentences(text: str) -> list[str]:
    """Sentences of ``text``, whitespace collapsed; a blank line also ends a sentence."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        sentences.extend(sentence for sentence in _SENTENCE_END.split(flat) if sentence)
    return sentences


def _first_sentence(text: str) -> str:
    sentences = _sentences(text)
    return sentences[0] if sentences else ""


def _first_paragraph(text: str) -> str:
    """The lines of ``text`` up to a blank line or a nested list item, joined."""
    collected: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if collected:
                break
            continue
        if collected and _read_marker(line) is not None:
            break
        collected.append(line)
    return " ".join(collected)


def _clean_inline(text: str) -> str:
    """``text`` without tags, emphasis, heading marks or trailing punctuation."""
    text = _EMPHASIS.sub("", _TAG.sub(" ", text))
    text = " ".join(re.sub(r"^#+\s+", "", text.strip()).split())
    text = text.rstrip(" ,;:")
    return text[:-1] if text.endswith(".") and not text.endswith("..") else text


def _shorten(text: str, limit: int = MAX_TITLE_LENGTH) -> str:
    """``text`` if it fits in ``limit``, else its first sentence, else cut at a word."""
    if len(text) <= limit:
        return text
    sentence = _first_sentence(text)
    if len(sentence) <= limit:
        return sentence
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def _title(text: str) -> str:
    """A title from the first paragraph of ``text``; empty when it has no words."""
    return _shorten(_clean_inline(_first_paragraph(text)))


def _without_connector(text: str) -> str:
    """``text`` without the ordering words that open it, capitalised."""
    rest = _LEADING_CONNECTOR.sub("", text.strip()) or text.strip()
    return rest[:1].upper() + rest[1:]


# --- ordering words ----------------------------------------------------------------------------

_WITH_START = re.compile(
    r"^(?:meanwhile|in the meantime|in parallel|independently|at the same time|concurrently"
    r"|simultaneously)\b"
)
_WITH_ANYWHERE = re.compile(
    r"\b(?:in parallel (?:with|to)|at the same time as|concurrently with|simultaneously with"
    r"|independently of|alongside|while)\s+(?:the previous|steps?|items?|tasks?|phases?"
    r"|stages?|\d)"
)
_AFTER_PATTERNS = tuple(
    re.compile(pattern)
    for pattern in (
        r"^(?:and )?(?:then|next|after that|after this|afterwards?|subsequently|later"
        r"|second(?:ly)?|third(?:ly)?)\b",
        r"\b(?:after that|afterwards)\b",
        r"^(?:once|after)\b(?P<subject>[^,;:]*)",
        r"\b(?:once|when)\b(?P<subject>[^,;:.]{0,80}?)\b(?:is|are|has been|have been)\s+"
        r"(?:done|finished|complete|completed|ready|available|in place)\b",
        r"\b(?:depends|depending|relies|relying|builds|building) on\b(?P<subject>[^,;:.]*)",
        r"\b(?:using|use|uses|with|from|on) the (?:results?|outputs?|findings?|data)"
        r" (?:of|from)\b(?P<subject>[^,;:.]*)",
        r"\b(?:only after|wait(?:s|ing)? for|after|needs|requires)\s+"
        r"(?P<subject>(?:steps?|items?|tasks?|phases?|stages?|parts?)\s+\d[^,;:.]*)",
    )
)
_FAN_IN_START = re.compile(
    r"^(?:finally|lastly|last of all|in the end|at the end|to finish|to conclude|final)\b"
)
_GATHER = re.compile(
    r"^(?:combine|merge|aggregate|summari[sz]e|compile|consolidate|collect|gather|collate"
    r"|synthesi[sz]e|integrate)\b"
)
_GATHERED = re.compile(
    r"\b(?:results?|outputs?|findings?|answers?|reports?|summar(?:y|ies)|everything|all"
    r"|them|these|those|both|above|previous|each|every)\b"
)
_REPORT = re.compile(
    r"^(?:write|produce|prepare|create|draft|compile)\s+(?:up\s+)?(?:a|an|the|one)\s+"
    r"(?:(?:final|single|combined|overall|summary)\s+)?(?:report|summary|write-?up|overview)\b"
)
_STEP_REFERENCE = re.compile(
    r"\b(?:steps?|items?|tasks?|phases?|stages?|parts?)\s+"
    r"(?P<numbers>\d{1,4}(?:\s*(?:,|and|&|to|-|\u2013)\s*\d{1,4})*)"
)
_INDEPENDENT = re.compile(
    r"\b(?:in parallel|independently|independent|any order|at the same time|concurrently"
    r"|simultaneously|no particular order)\b"
)
_IN_ORDER = re.compile(
    r"\b(?:in (?:this|that|the given|the following|the listed) order|in order\b(?!\s+(?:to|for"
    r"|that)\b)|in sequence|sequentially|one after (?:another|the other)|one by one"
    r"|step by step)\b"
)
_STOPWORDS = frozenset(
    [
        "the",
        "and",
        "for",
        "with",
        "from",
        "into",
        "onto",
        "that",
        "this",
        "these",
        "those",
        "them",
        "they",
        "their",
        "its",
        "are",
        "was",
        "were",
        "been",
        "being",
        "has",
        "have",
        "had",
        "all",
        "any",
        "each",
        "every",
        "done",
        "finished",
        "complete",
        "completed",
        "ready",
        "available",
        "result",
        "results",
        "output",
        "outputs",
        "previous",
        "above",
        "step",
        "steps",
        "item",
        "items",
        "task",
        "tasks",
        "once",
        "when",
        "after",
        "then",
    ]
)


def _cue_text(head: str) -> str:
    text = " ".join(_EMPHASIS.sub("", _TAG.sub(" ", head)).lower().split())
    return re.sub(r"^[^a-z0-9]+", "", text)


def _read_cue(head: str) -> _Cue:
    """The ordering words of ``head``, the first sentence or line of a unit."""
    text = _cue_text(head)
    steps = _step_references(text)
    if _WITH_START.match(text) or _WITH_ANYWHERE.search(text):
        return _Cue(_Order.WITH, steps)
    after = next((m for p in _AFTER_PATTERNS if (m := p.search(text)) is not None), None)
    if after is not None and steps:
        return _Cue(_Order.AFTER, steps)
    if _is_fan_in(text):
        return _Cue(_Order.FAN_IN)
    if after is not None:
        return _Cue(_Order.AFTER, subject=after.groupdict().get("subject") or "")
    return _Cue()


def _is_fan_in(text: str) -> bool:
    core = _LEADING_CONNECTOR.sub("", text)
    return bool(
        _FAN_IN_START.match(text)
        or _FAN_IN_START.match(core)
        or (_GATHER.match(core) and _GATHERED.search(core))
        or _REPORT.match(core)
    )


def _step_references(text: str) -> tuple[int, ...]:
    """Numbers named as "step 2", "steps 1 and 3", "steps 2-4" in ``text``."""
    numbers: list[int] = []
    for reference in _STEP_REFERENCE.finditer(text):
        for part in re.split(r"\s*(?:,|and|&)\s*", reference["numbers"]):
            bounds = [int(bound) for bound in re.split(r"\s*(?:to|-|\u2013)\s*", part)]
            low, high = bounds[0], max(bounds)
            numbers.extend(range(low, min(high, low + MAX_SUBTASKS) + 1))
    return tuple(dict.fromkeys(numbers))


def _sequential(numbered: bool, context: str) -> bool:
    """Whether a group runs in order: numbered, unless its surrounding text says otherwise."""
    text = _cue_text(context)
    if _INDEPENDENT.search(text):
        return False
    if _IN_ORDER.search(text):
        return True
    return numbered


def _stems(text: str) -> set[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {word[:5] for word in words if len(word) >= 3 and word not in _STOPWORDS}


# --- Markdown lines ----------------------------------------------------------------------------

_FENCE = re.compile(r"\s*(?P<fence>```|~~~)")
_HEADING = re.compile(r" {0,3}(?P<hashes>#{1,6})[ \t]+(?P<text>.*?)(?:[ \t]+#+)?[ \t]*")
_LIST_MARKER = re.compile(
    r"(?:[-*+]|(?P<number>\d{1,9})[.)]|\((?P<paren>\d{1,9})\))[ \t]+(?P<rest>\S.*)"
)
_CHECKBOX = re.compile(r"\[[ xX]\](?:[ \t]+|$)(?P<rest>.*)")
_STEP_LABEL = re.compile(
    r"(?:[*_]{2})?(?:step|phase|stage)\s+(?P<number>\d{1,9})(?:[*_]{2})?\s*[:.)\u2013\u2014-]"
    r"(?:[*_]{2})?\s*(?P<rest>.*)",
    re.I,
)
_HEADING_LABEL = re.compile(
    r"(?:(?:step|phase|stage|part)\s+(?P<word>\d{1,9})\b\s*[:.)\u2013\u2014-]?"
    r"|(?P<number>\d{1,9})[.)](?=\s|$))\s*(?P<rest>.*)",
    re.I,
)


@dataclass(frozen=True, slots=True)
class _Marker:
    """The list marker that opens a line."""

    kind: _Kind
    label: int | None
    rest: str
    """The item's text on this line, without the marker, checkbox or step label."""


@dataclass(frozen=True, slots=True)
class _Line:
    text: str
    indent: int
    blank: bool = False
    heading: int = 0
    """ATX heading level; 0 when the line is not a heading."""
    heading_text: str = ""
    marker: _Marker | None = None


def _read_lines(description: str) -> list[_Line]:
    """Classify every line; lines inside code fences are never headings or list items."""
    lines: list[_Line] = []
    fence = ""
    for raw in description.expandtabs(4).splitlines():
        if fence:
            lines.append(_verbatim(raw))
            if raw.strip().startswith(fence):
                fence = ""
            continue
        opener = _FENCE.match(raw)
        if opener:
            fence = opener["fence"]
            lines.append(_verbatim(raw))
            continue
        lines.append(_classify(raw))
    return lines


def _indent(raw: str) -> int:
    return len(raw) - len(raw.lstrip(" "))


def _verbatim(raw: str) -> _Line:
    return _Line(raw, _indent(raw), blank=not raw.strip())


def _classify(raw: str) -> _Line:
    stripped = raw.strip()
    if not stripped:
        return _Line(raw, _indent(raw), blank=True)
    heading = _HEADING.fullmatch(raw)
    if heading and heading["text"].strip():
        level, text = len(heading["hashes"]), heading["text"].strip()
        return _Line(raw, _indent(raw), heading=level, heading_text=text)
    return _Line(raw, _indent(raw), marker=_read_marker(stripped))


def _read_marker(stripped: str) -> _Marker | None:
    """The marker of a stripped line: ``-``, ``*``, ``+``, ``1.``, ``1)``, ``(1)``, ``Step 1:``."""
    listed = _LIST_MARKER.fullmatch(stripped)
    if listed is None:
        step = _STEP_LABEL.fullmatch(stripped)
        if step is None:
            return None
        return _Marker(_Kind.NUMBERED_STEP, int(step["number"]), step["rest"])
    rest = listed["rest"]
    checkbox = _CHECKBOX.fullmatch(rest)
    if checkbox:
        rest = checkbox["rest"]
    number = listed["number"] or listed["paren"]
    step = _STEP_LABEL.fullmatch(rest)
    if step:
        rest = step["rest"]
    label = int(number) if number else int(step["number"]) if step else None
    if number:
        kind = _Kind.NUMBERED_STEP
    else:
        kind = _Kind.CHECKLIST_ITEM if checkbox else _Kind.BULLETED_ITEM
    return _Marker(kind, label, rest)


def _joined(lines: Sequence[_Line]) -> str:
    return textwrap.dedent("\n".join(line.text for line in lines)).strip()


# --- blocks: paragraphs and lists --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    kind: _Kind
    label: int | None
    text: str
    """Full text without the marker, nested lines included."""


@dataclass(frozen=True, slots=True)
class _ListBlock:
    items: tuple[_Item, ...]


_Block: TypeAlias = str | _ListBlock
"""A paragraph (its text) or a list."""


def _read_blocks(lines: Sequence[_Line]) -> list[_Block]:
    blocks: list[_Block] = []
    paragraph: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.marker is None:
            if not line.blank:
                paragraph.append(line.text.strip())
            elif paragraph:
                blocks.append("\n".join(paragraph))
                paragraph = []
            index += 1
            continue
        if paragraph:
            blocks.append("\n".join(paragraph))
            paragraph = []
        block, index = _read_list(lines, index)
        blocks.append(block)
    if paragraph:
        blocks.append("\n".join(paragraph))
    return blocks


def _is_top_marker(line: _Line, base: int) -> bool:
    return line.marker is not None and line.indent < base + _NESTING_INDENT


def _is_numbered(marker: _Marker) -> bool:
    return marker.kind is _Kind.NUMBERED_STEP


def _read_list(lines: Sequence[_Line], start: int) -> tuple[_ListBlock, int]:
    """The list that starts at ``lines[start]`` and the index of the line after it.

    Items are the markers at the list's own indentation; everything under an item (nested
    lists, indented or lazy continuation lines) is part of its text.
    """
    first = lines[start].marker
    assert first is not None
    base, numbered = lines[start].indent, _is_numbered(first)
    items: list[tuple[_Marker, list[str]]] = []
    index = start
    while index < len(lines):
        line = lines[index]
        if line.marker is not None and _is_top_marker(line, base):
            if _is_numbered(line.marker) != numbered:
                break
            items.append((line.marker, [line.marker.rest]))
        elif (
            line.heading
            or _is_intro_of_next_list(line, base)
            or (line.blank and not _list_goes_on(lines, index, base, items[-1][0]))
        ):
            break
        else:
            items[-1][1].append(line.text)
        index += 1
    return _ListBlock(tuple(_item(marker, body) for marker, body in items)), index


def _is_intro_of_next_list(line: _Line, base: int) -> bool:
    """An unindented line ending with ':' introduces what follows; it is not a lazy line."""
    return line.indent < base + _NESTING_INDENT and line.text.rstrip().endswith(":")


def _list_goes_on(lines: Sequence[_Line], blank: int, base: int, last: _Marker) -> bool:
    """Whether the list continues past the blank line ``lines[blank]``."""
    following = next(
        (lines[index] for index in range(blank, len(lines)) if not lines[index].blank), None
    )
    if following is None or following.heading:
        return False
    if following.indent >= base + _NESTING_INDENT:
        return True
    if following.marker is not None:
        return _is_numbered(following.marker) == _is_numbered(last)
    # An unindented paragraph between numbered items belongs to the item above it when the
    # numbering resumes after it (1. ... text ... 2.).
    return last.label is not None and _next_label(lines, blank, base) == last.label + 1


def _next_label(lines: Sequence[_Line], start: int, base: int) -> int | None:
    for index in range(start, len(lines)):
        line = lines[index]
        if line.heading:
            return None
        if line.marker is not None and _is_top_marker(line, base):
            return line.marker.label
    return None


def _item(marker: _Marker, body: list[str]) -> _Item:
    nested = textwrap.dedent("\n".join(body[1:]))
    return _Item(marker.kind, marker.label, f"{marker.rest}\n{nested}".strip())


# --- units: sections, lists, paragraphs --------------------------------------------------------


@dataclass(slots=True)
class _ListPart:
    """A list of a scope with the paragraphs that introduce and follow it."""

    block: _ListBlock
    intro: tuple[str, ...]
    outro: list[str] = field(default_factory=list)


def _read_structure(description: str) -> _Unit | None:
    """The units of ``description``; None when it has no structure worth splitting."""
    lines = _read_lines(description)
    structured = _scope_group(lines, context="")
    if structured is not None:
        return structured
    return _prose_group("\n".join(line.text for line in lines if not line.heading))


def _scope_group(lines: Sequence[_Line], context: str) -> _Unit | None:
    """The units of a scope (the description or a section body), by headings, then lists."""
    counts = Counter(line.heading for line in lines if line.heading)
    levels = [level for level, count in counts.items() if count >= 2]
    if levels:
        return _sections_group(lines, min(levels), context)
    return _lists_group(_read_blocks(lines), context)


def _sections_group(lines: Sequence[_Line], level: int, context: str) -> _Unit:
    """One unit per heading of ``level``; text before the first one is context only."""
    starts = [index for index, line in enumerate(lines) if line.heading == level]
    ends = [*starts[1:], len(lines)]
    sections = [
        _section_unit(lines[start], lines[start + 1 : end])
        for start, end in zip(starts, ends, strict=True)
    ]
    numbered = all(section.label is not None for section in sections)
    preamble = _joined(lines[: starts[0]])
    return _group(sections, _sequential(numbered, f"{context}\n{preamble}"))


def _section_unit(heading: _Line, body: Sequence[_Line]) -> _Unit:
    """A section: a group when its body splits into two or more units, else a leaf."""
    cleaned = _clean_inline(heading.heading_text) or heading.heading_text
    label, title = _split_label(cleaned)
    cue = _read_cue(title)
    if cue.order is _Order.DEFAULT:
        cue = _read_cue(_first_sentence(_leading_paragraph(body)))
    text = _joined(body)
    inner = _scope_group(body, heading.heading_text)
    tagged = _capabilities(heading.heading_text)
    if inner is not None and _count_leaves(inner) >= 2:
        capabilities = _merged(tagged, inner.capabilities)
        return replace(
            inner, title=title, text=text, cue=cue, label=label, capabilities=capabilities
        )
    return _Unit(
        title=title,
        text=text or title,
        cue=cue,
        label=label,
        kind=_Kind.SECTION,
        capabilities=_merged(tagged, _capabilities(text)),
    )


def _split_label(title: str) -> tuple[int | None, str]:
    """``(2, "Train")`` for "2. Train" or "Step 2: Train"; ``(None, title)`` otherwise."""
    labelled = _HEADING_LABEL.fullmatch(title)
    if labelled is None:
        return None, title
    return int(labelled["word"] or labelled["number"]), labelled["rest"] or title


def _leading_paragraph(lines: Sequence[_Line]) -> str:
    """The paragraph that opens ``lines``; empty when they open with a list or heading."""
    paragraph: list[str] = []
    for line in lines:
        if line.blank:
            if paragraph:
                break
            continue
        if line.marker is not None or line.heading:
            break
        paragraph.append(line.text.strip())
    return " ".join(paragraph)


def _lists_group(blocks: Sequence[_Block], context: str) -> _Unit | None:
    """The lists of a scope, with the paragraphs that order them; None without a list."""
    parts = _scope_parts(blocks)
    lists = [part for part in parts if isinstance(part, _ListPart)]
    if not lists:
        return None
    if len(parts) == 1:
        return _list_group(lists[0], context)
    units = [
        _collapsed(_list_group(part, context))
        if isinstance(part, _ListPart)
        else _paragraph_unit(part)
        for part in parts
    ]
    return _group(units, sequential=False)


def _scope_parts(blocks: Sequence[_Block]) -> list[_ListPart | str]:
    """Lists with their intros and outros, and the paragraphs that are steps of their own.

    A paragraph before a list introduces it. A paragraph after a list is a step of its own
    when its first sentence has ordering words ("Then summarise the results."); otherwise
    it is context (an outro of the list, or more text of the step above it).
    """
    parts: list[_ListPart | str] = []
    intro: list[str] = []
    for index, block in enumerate(blocks):
        if isinstance(block, _ListBlock):
            parts.append(_ListPart(block, tuple(intro)))
            intro = []
        elif not parts or (index + 1 < len(blocks) and isinstance(blocks[index + 1], _ListBlock)):
            intro.append(block)
        elif _read_cue(_first_sentence(block)).order is not _Order.DEFAULT:
            parts.append(block)
        elif isinstance(parts[-1], _ListPart):
            parts[-1].outro.append(block)
        else:
            parts[-1] = f"{parts[-1]}\n\n{block}"
    return parts


def _list_group(part: _ListPart, context: str) -> _Unit:
    """A list's items, in order when numbered, unless the text around it says otherwise."""
    intro = "\n\n".join(part.intro)
    items = tuple(unit for unit in map(_item_unit, part.block.items) if unit is not None)
    numbered = all(item.label is not None for item in part.block.items)
    surrounding = "\n".join([context, intro, *part.outro])
    return _Unit(
        title=_title(intro),
        text=intro,
        cue=_read_cue(_first_sentence(intro)),
        capabilities=_capabilities(intro),
        children=items,
        sequential=_sequential(numbered, surrounding),
    )


def _collapsed(group: _Unit) -> _Unit:
    """A group of one unit becomes that unit, keeping the group's ordering words and tags."""
    if len(group.children) != 1:
        return group
    only = group.children[0]
    cue = group.cue if only.cue.order is _Order.DEFAULT else only.cue
    return replace(only, cue=cue, capabilities=_merged(group.capabilities, only.capabilities))


def _item_unit(item: _Item) -> _Unit | None:
    title = _title(item.text)
    if not title:
        return None
    return _Unit(
        title=title,
        text=item.text,
        cue=_read_cue(_first_paragraph(item.text)),
        label=item.label,
        kind=item.kind,
        capabilities=_capabilities(item.text),
    )


def _paragraph_unit(text: str) -> _Unit:
    head = _first_sentence(text)
    return _Unit(
        title=_shorten(_clean_inline(head)) or "Paragraph",
        text=text,
        cue=_read_cue(head),
        kind=_Kind.PARAGRAPH,
        capabilities=_capabilities(text),
    )


# --- prose -------------------------------------------------------------------------------------

_CLAUSE_BREAK = re.compile(
    r"\s*[,;]\s*(?:and\s+)?(?=(?:then|next|finally|lastly|after that|afterwards?"
    r"|subsequently)\b)"
    r"|\s+and\s+(?=(?:then|finally|lastly|after that|afterwards?)\b)"
    r"|\s+(?=then\b)",
    re.I,
)
_CONDITION = re.compile(r"\b(?:if|unless|whether)\b", re.I)
_NOT_BEFORE_A_STEP = frozenset(
    [
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "since",
        "by",
        "until",
        "till",
        "from",
        "even",
        "back",
        "just",
        "only",
        "or",
        "but",
        "now",
        "and",
    ]
)
_FOR_EACH = re.compile(r"\bfor\s+(?:each|every|all)(?:\s+one)?\s+of\s+", re.I)
_FOR = re.compile(r"\bfor\s+(?P<both>both\s+)?", re.I)
_COMPARING = re.compile(
    r"\W*(?:compare|contrast|rank|choose|pick|select|decide|weigh|match)\b", re.I
)
_LAST_IS_AND = re.compile(r"(?:\band|&)\s+[^,&]+$", re.I)
_ENUMERATION_SEPARATOR = re.compile(r"\s*,\s*(?:(?:and|&)\s+)?|\s+(?:and|&)\s+", re.I)


def _prose_group(text: str) -> _Unit | None:
    """Steps of prose joined by ordering words, run in order.

    None when the prose is one step that enumerates nothing.
    """
    units = [_prose_unit(step) for step in _prose_steps(text)]
    units = [unit for unit in units if unit.title]
    if len(units) >= 2:
        return _group(units, sequential=True)
    if len(units) == 1 and units[0].kind is None:
        return units[0]
    return None


def _prose_steps(text: str) -> list[str]:
    """Split ``text`` where ordering words start a new step.

    A clause split off by ", then", "and finally" ... starts a step, and so does a sentence
    whose first words order it ("After that, ...", "Once it is built, ..."). Any other
    sentence adds to the step before it.
    """
    steps: list[str] = []
    for sentence in _sentences(text):
        for position, clause in enumerate(_clauses(sentence)):
            ordered = _read_cue(clause).order is not _Order.DEFAULT
            if steps and position == 0 and not ordered:
                steps[-1] = f"{steps[-1]} {clause}"
            else:
                steps.append(clause)
    return steps


def _clauses(sentence: str) -> list[str]:
    """``sentence`` cut before its connecting "then", "finally", "after that" ...

    The "then" of "if ... then" and adverbial ones ("is then trained") do not cut.
    """
    clauses: list[str] = []
    start = scan = 0
    for match in _CLAUSE_BREAK.finditer(sentence):
        before = sentence[scan : match.start()]
        scan = match.end()
        if _CONDITION.search(before):
            continue
        words = before.split()
        if not match.group().strip() and words and words[-1].lower() in _NOT_BEFORE_A_STEP:
            continue
        clauses.append(sentence[start : match.start()])
        start = match.end()
    clauses.append(sentence[start:])
    return [clause.strip() for clause in clauses if clause.strip()]


def _prose_unit(step: str) -> _Unit:
    """A prose step: a leaf, or a parallel group when it says "X for each of A, B and C"."""
    text = _without_connector(step)
    cue = _read_cue(step)
    variants = _enumerated_variants(text)
    if not variants:
        return _Unit(
            title=_title(text),
            text=text,
            cue=cue,
            kind=_Kind.PROSE_STEP,
            capabilities=_capabilities(text),
        )
    children = tuple(
        _Unit(
            title=_title(variant),
            text=variant,
            kind=_Kind.ENUMERATED_ITEM,
            capabilities=_capabilities(variant),
        )
        for variant in variants
    )
    return _Unit(title=_title(text), text=text, cue=cue, children=children)


def _enumerated_variants(text: str) -> tuple[str, ...]:
    """One copy of ``text`` per item of its first "for each of A, B and C" list."""
    sentences = _sentences(text)
    for index, sentence in enumerate(sentences):
        variants = _sentence_variants(sentence)
        if variants:
            return tuple(
                " ".join([*sentences[:index], one, *sentences[index + 1 :]]) for one in variants
            )
    return ()


def _sentence_variants(sentence: str) -> tuple[str, ...]:
    each = _FOR_EACH.search(sentence)
    if each is not None:
        return _variants(sentence, each.start(), each.end(), minimum=2, after_colon=True)
    for match in reversed(list(_FOR.finditer(sentence))):
        minimum = 2 if match["both"] else 3
        found = _variants(sentence, match.start(), match.end(), minimum, after_colon=False)
        if found:
            return found
    return ()


def _variants(
    sentence: str, start: int, end: int, minimum: int, after_colon: bool
) -> tuple[str, ...]:
    """``sentence`` with the list after ``for`` (``sentence[start:end]``) cut to each item.

    The list runs to the end of the sentence; its items are separated by commas and a final
    "and", each at most six words. "Compare ... for A, B and C" is not split.
    """
    action = sentence[:start].strip()
    if not action or _COMPARING.match(action):
        return ()
    listed = sentence[end:].rstrip().rstrip(".!?;").rstrip()
    stop = end + len(listed)
    if after_colon and ":" in listed:
        listed = listed.split(":", 1)[1]
    items = _enumeration(listed, minimum)
    return tuple(f"{sentence[:start]}for {item}{sentence[stop:]}" for item in items)


def _enumeration(listed: str, minimum: int) -> tuple[str, ...]:
    listed = listed.strip()
    if not _LAST_IS_AND.search(listed) or (minimum >= 3 and "," not in listed):
        return ()
    items = [item.strip() for item in _ENUMERATION_SEPARATOR.split(listed)]
    too_long = any(not item or len(item.split()) > _MAX_ENUMERATED_WORDS for item in items)
    if len(items) < minimum or too_long:
        return ()
    return tuple(items)


# --- dependencies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaf:
    unit: _Unit
    depends_on: frozenset[int]
    """Indexes of earlier leaves."""
    capabilities: tuple[str, ...]


def _union(sets: Iterable[frozenset[int]]) -> frozenset[int]:
    return frozenset().union(*sets)


def _place(root: _Unit) -> list[_Leaf]:
    """The leaves of ``root`` in document order, with their dependencies."""
    leaves: list[_Leaf] = []
    _place_unit(root, frozenset(), (), leaves)
    return leaves


def _place_unit(
    unit: _Unit, depends_on: frozenset[int], inherited: tuple[str, ...], leaves: list[_Leaf]
) -> frozenset[int]:
    """Append the leaves of ``unit``; return its exits (the leaves that finish it)."""
    capabilities = _merged(inherited, unit.capabilities)
    if unit.kind is not None:
        leaves.append(_Leaf(unit, depends_on, capabilities))
        return frozenset({len(leaves) - 1})
    siblings = _Siblings(unit.sequential)
    for child in unit.children:
        prerequisites = siblings.prerequisites_of(child.cue)
        entry = siblings.exits_of(prerequisites) if prerequisites else depends_on
        siblings.add(child, prerequisites, _place_unit(child, entry, capabilities, leaves))
    return siblings.exits_of(siblings.unawaited)


@dataclass(slots=True)
class _Siblings:
    """The children of a group placed so far, and what the next one may wait for."""

    sequential: bool
    prerequisites: list[frozenset[int]] = field(default_factory=list)
    """For each child, the earlier children it waits for."""
    exits: list[frozenset[int]] = field(default_factory=list)
    """For each child, the leaves that finish it."""
    unawaited: set[int] = field(default_factory=set)
    """Children no later child waits for yet."""
    by_label: dict[int, int] = field(default_factory=dict)
    """Child index by number ("3." or "Step 3"), the first one when repeated."""
    title_stems: list[set[str]] = field(default_factory=list)

    def add(self, child: _Unit, prerequisites: frozenset[int], exits: frozenset[int]) -> None:
        """Record a placed child."""
        index = len(self.exits)
        if child.label is not None:
            self.by_label.setdefault(child.label, index)
        self.prerequisites.append(prerequisites)
        self.exits.append(exits)
        self.title_stems.append(_stems(child.title))
        self.unawaited -= prerequisites
        self.unawaited.add(index)

    def exits_of(self, children: Iterable[int]) -> frozenset[int]:
        """The leaves that finish ``children``."""
        return _union(self.exits[index] for index in children)

    def prerequisites_of(self, cue: _Cue) -> frozenset[int]:
        """Which earlier children the next child, whose words are ``cue``, waits for."""
        count = len(self.exits)
        if count == 0:
            return frozenset()
        named = self._named(cue)
        if cue.order is _Order.WITH:
            return _union(self.prerequisites[index] for index in (named or {count - 1}))
        if cue.order is _Order.FAN_IN:
            return named or frozenset(self.unawaited)
        if cue.order is _Order.AFTER or self.sequential:
            return named or self._previous()
        return frozenset()

    def _previous(self) -> frozenset[int]:
        """In an ordered group, everything unfinished; otherwise the child just before."""
        if self.sequential:
            return frozenset(self.unawaited)
        return frozenset({len(self.exits) - 1})

    def _named(self, cue: _Cue) -> frozenset[int]:
        """The earlier children ``cue`` names by number, else by words; empty if none."""
        if self.by_label:
            found = frozenset(self.by_label[n] for n in cue.steps if n in self.by_label)
        else:
            found = frozenset(n - 1 for n in cue.steps if 1 <= n <= len(self.exits))
        if found or not cue.subject:
            return found
        wanted = _stems(cue.subject)
        scores = [len(wanted & stems) for stems in self.title_stems]
        best = max(scores)
        if best == 0:
            return frozenset()
        return frozenset({len(scores) - 1 - scores[::-1].index(best)})


# --- the plan ----------------------------------------------------------------------------------


def _plan(leaves: list[_Leaf], splitter: str) -> Plan:
    leaves, merged = _capped(leaves)
    ancestors = _ancestors(leaves)
    ids = [f"step-{index + 1}" for index in range(len(leaves))]
    aggregation = _aggregation(leaves, ancestors)
    subtasks = []
    for index, leaf in enumerate(leaves):
        depends_on = range(index) if index == aggregation else sorted(leaf.depends_on)
        subtasks.append(
            SubtaskSpec(
                local_id=ids[index],
                title=leaf.unit.title,
                description=leaf.unit.text,
                required_capabilities=leaf.capabilities,
                depends_on=tuple(ids[dependency] for dependency in depends_on),
            )
        )
    return Plan(
        parallelizable=not _is_total_order(ancestors),
        reason=_reason(leaves, ancestors, aggregation, merged),
        subtasks=tuple(subtasks),
        aggregation_local_id="" if aggregation is None else ids[aggregation],
        splitter=splitter,
    )


def _capped(leaves: list[_Leaf]) -> tuple[list[_Leaf], int]:
    """At most MAX_SUBTASKS leaves: the last one merges the rest; also how many it merged."""
    if len(leaves) <= MAX_SUBTASKS:
        return leaves, 0
    kept, rest = leaves[: MAX_SUBTASKS - 1], leaves[MAX_SUBTASKS - 1 :]
    suffix = f" (and {len(rest) - 1} more items)"
    merged = _Unit(
        title=_shorten(rest[0].unit.title, MAX_TITLE_LENGTH - len(suffix)) + suffix,
        text="\n\n".join(leaf.unit.text for leaf in rest),
        kind=rest[0].unit.kind,
    )
    depends_on = _union(leaf.depends_on for leaf in rest) & frozenset(range(len(kept)))
    capabilities = _merged((), (name for leaf in rest for name in leaf.capabilities))
    return [*kept, _Leaf(merged, depends_on, capabilities)], len(rest)


def _ancestors(leaves: Sequence[_Leaf]) -> list[int]:
    """For each leaf, the bit set of the leaves it waits for, directly or not."""
    result: list[int] = []
    for leaf in leaves:
        mask = 0
        for dependency in leaf.depends_on:
            mask |= result[dependency] | (1 << dependency)
        result.append(mask)
    return result


def _is_total_order(ancestors: Sequence[int]) -> bool:
    """Whether every leaf waits for all the leaves before it (no two can run together)."""
    return all(mask == (1 << index) - 1 for index, mask in enumerate(ancestors))


def _aggregation(leaves: Sequence[_Leaf], ancestors: Sequence[int]) -> int | None:
    """The last leaf, when it gathers results ("Finally ...") and waits for all others."""
    last = len(leaves) - 1
    gathers = leaves[last].unit.cue.order is _Order.FAN_IN
    return last if gathers and ancestors[last] == (1 << last) - 1 else None


def _reason(
    leaves: Sequence[_Leaf], ancestors: Sequence[int], aggregation: int | None, merged: int
) -> str:
    count = len(leaves)
    kinds = [kind.value for kind in dict.fromkeys(leaf.unit.kind for leaf in leaves) if kind]
    opening = f"Split into {count} sub-tasks, one per {' or '.join(kinds)}"
    if aggregation is None:
        reason = f"{opening}; {_shape(ancestors)}."
    else:
        quoted = _shorten(leaves[aggregation].unit.title, _QUOTED_TITLE_LENGTH)
        others = ancestors[:aggregation]
        before = f"the first {len(others)} {_plural_shape(others)} and " if len(others) > 1 else ""
        reason = f"{opening}; {before}'{quoted}' waits for all the others."
    if merged:
        reason += (
            f" The description has {count - 1 + merged} items; the last sub-task merges the"
            f" {merged} beyond the first {count - 1}."
        )
    return reason


def _shape(ancestors: Sequence[int]) -> str:
    """How the sub-tasks depend on each other, as a clause."""
    roots = sum(1 for mask in ancestors if mask == 0)
    if roots == len(ancestors):
        return "they do not depend on each other"
    if _is_total_order(ancestors):
        return "each waits for the previous one"
    return f"{roots} can start at once and {len(ancestors) - roots} wait for earlier ones"


def _plural_shape(ancestors: Sequence[int]) -> str:
    """How the sub-tasks depend on each other, as a predicate of "the first N"."""
    roots = sum(1 for mask in ancestors if mask == 0)
    if roots == len(ancestors):
        return "do not depend on each other"
    if _is_total_order(ancestors):
        return "run one after another"
    return f"are partly ordered ({roots} can start at once)"
