"""The builtin AUTO splitter, driven by descriptions and the plans they must give."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from agentcoord.core.splitter import MAX_SUBTASKS, BuiltinSplitter, Splitter
from agentcoord.core.tasks import Plan, SplitPolicy, TaskSpec

LOCAL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
CAPABILITY = re.compile(r"[a-z0-9_.:-]{1,64}")


def split(description: str, title: str = "The task") -> Plan:
    return BuiltinSplitter().split(TaskSpec(title, SplitPolicy.AUTO, description=description))


def edges(plan: Plan) -> set[tuple[str, str]]:
    """Dependencies as (dependent title, prerequisite title) pairs."""
    titles = {subtask.local_id: subtask.title for subtask in plan.subtasks}
    return {
        (subtask.title, titles[prerequisite])
        for subtask in plan.subtasks
        for prerequisite in subtask.depends_on
    }


def aggregation_title(plan: Plan) -> str | None:
    by_id = {subtask.local_id: subtask.title for subtask in plan.subtasks}
    return by_id[plan.aggregation_local_id] if plan.aggregation_local_id else None


@dataclass(frozen=True)
class Case:
    id: str
    description: str
    titles: list[str]
    edges: set[tuple[str, str]]
    parallelizable: bool
    aggregation: str | None = None
    reason: str = ""
    """A part the reason must contain."""


CASES = [
    Case(
        "checklist",
        "- [ ] Write the parser\n- [x] Write the lexer\n- [ ] Write the docs",
        ["Write the parser", "Write the lexer", "Write the docs"],
        set(),
        True,
        reason="one per checklist item; they do not depend on each other",
    ),
    Case(
        "bullets with fan-in finally",
        "Research:\n* Competitor A\n* Competitor B\n* Competitor C\n* Finally, write the report",
        ["Competitor A", "Competitor B", "Competitor C", "Finally, write the report"],
        {
            ("Finally, write the report", "Competitor A"),
            ("Finally, write the report", "Competitor B"),
            ("Finally, write the report", "Competitor C"),
        },
        True,
        aggregation="Finally, write the report",
        reason="'Finally, write the report' waits for all the others",
    ),
    Case(
        "numbered steps run in order",
        "1. Fetch the data\n2. Clean it\n3. Train the model",
        ["Fetch the data", "Clean it", "Train the model"],
        {("Clean it", "Fetch the data"), ("Train the model", "Clean it")},
        False,
        reason="each waits for the previous one",
    ),
    Case(
        "Step N lines with a paragraph under a step",
        "Step 1: Download the archive\n\nIt is on the mirror.\n\n"
        "Step 2: Unpack it\nStep 3: Install",
        ["Download the archive", "Unpack it", "Install"],
        {("Unpack it", "Download the archive"), ("Install", "Unpack it")},
        False,
    ),
    Case(
        "numbered list the text calls independent",
        "These can be done in any order:\n1) Lint\n2) Type-check\n3) Spell-check",
        ["Lint", "Type-check", "Spell-check"],
        set(),
        True,
    ),
    Case(
        "bullets the text puts in order",
        "Do the following in this order:\n+ Stop the service\n+ Back up the disk\n+ Upgrade",
        ["Stop the service", "Back up the disk", "Upgrade"],
        {("Back up the disk", "Stop the service"), ("Upgrade", "Back up the disk")},
        False,
    ),
    Case(
        "a bullet starting with then waits for the one before only",
        "- Build the image\n- Then push it to the registry\n- Write the changelog",
        ["Build the image", "Then push it to the registry", "Write the changelog"],
        {("Then push it to the registry", "Build the image")},
        True,
        reason="2 can start at once and 1 wait for earlier ones",
    ),
    Case(
        "once ... is done names the item it waits for",
        "- Run the database migration\n- Update the documentation\n"
        "- Once the migration is done, restart the service",
        [
            "Run the database migration",
            "Update the documentation",
            "Once the migration is done, restart the service",
        ],
        {("Once the migration is done, restart the service", "Run the database migration")},
        True,
    ),
    Case(
        "after step 2",
        "1. Write the schema\n2. Generate the models\n3. Write the API docs\n"
        "4. Build the client library after step 2",
        [
            "Write the schema",
            "Generate the models",
            "Write the API docs",
            "Build the client library after step 2",
        ],
        {
            ("Generate the models", "Write the schema"),
            ("Write the API docs", "Generate the models"),
            ("Build the client library after step 2", "Generate the models"),
        },
        True,
    ),
    Case(
        "at the same time as step 2",
        "1. Provision the database\n2. Build the backend\n"
        "3. Build the frontend at the same time as step 2\n4. Deploy everything",
        [
            "Provision the database",
            "Build the backend",
            "Build the frontend at the same time as step 2",
            "Deploy everything",
        ],
        {
            ("Build the backend", "Provision the database"),
            ("Build the frontend at the same time as step 2", "Provision the database"),
            ("Deploy everything", "Build the backend"),
            ("Deploy everything", "Build the frontend at the same time as step 2"),
        },
        True,
    ),
    Case(
        "headings: sections, a section's list, and a section that says then",
        "# Release\nShip version 2.\n\n## Build\nCompile the binaries.\n\n## Test\n"
        "- Run the unit tests\n- Run the integration tests\n\n## Publish\n"
        "Then upload the artifacts.",
        ["Build", "Run the unit tests", "Run the integration tests", "Publish"],
        {("Publish", "Run the unit tests"), ("Publish", "Run the integration tests")},
        True,
        reason="one per section or bulleted item",
    ),
    Case(
        "numbered headings are phases in order",
        "## 1. Build\nCompile.\n## 2. Test\n- Unit tests\n- Integration tests\n"
        "## 3. Publish\nUpload.",
        ["Build", "Unit tests", "Integration tests", "Publish"],
        {
            ("Unit tests", "Build"),
            ("Integration tests", "Build"),
            ("Publish", "Unit tests"),
            ("Publish", "Integration tests"),
        },
        True,
    ),
    Case(
        "a summary section that says finally",
        "## Research\n- Read paper A\n- Read paper B\n\n## Summary\n"
        "Finally, combine the findings into one page.",
        ["Read paper A", "Read paper B", "Summary"],
        {("Summary", "Read paper A"), ("Summary", "Read paper B")},
        True,
        aggregation="Summary",
    ),
    Case(
        "prose chain with then and finally",
        "Fetch the data, then clean it, then train the model and finally write a report.",
        ["Fetch the data", "Clean it", "Train the model", "Write a report"],
        {
            ("Clean it", "Fetch the data"),
            ("Train the model", "Clean it"),
            ("Write a report", "Fetch the data"),
            ("Write a report", "Clean it"),
            ("Write a report", "Train the model"),
        },
        False,
        aggregation="Write a report",
        reason="one per step of the text; the first 3 run one after another",
    ),
    Case(
        "prose sentences: after that, at the same time",
        "Build the backend. At the same time, build the frontend. After that, deploy both.",
        ["Build the backend", "At the same time, build the frontend", "Deploy both"],
        {
            ("Deploy both", "Build the backend"),
            ("Deploy both", "At the same time, build the frontend"),
        },
        True,
    ),
    Case(
        "for each of",
        "Summarize the quarterly sales for each of Germany, France and Spain.",
        [
            "Summarize the quarterly sales for Germany",
            "Summarize the quarterly sales for France",
            "Summarize the quarterly sales for Spain",
        ],
        set(),
        True,
        reason="one per item of a 'for each' list",
    ),
    Case(
        "for A, B, and C, then a step that waits for all of them",
        "Translate the README for French, German, and Italian, then review the translations.",
        [
            "Translate the README for French",
            "Translate the README for German",
            "Translate the README for Italian",
            "Review the translations",
        ],
        {
            ("Review the translations", "Translate the README for French"),
            ("Review the translations", "Translate the README for German"),
            ("Review the translations", "Translate the README for Italian"),
        },
        True,
    ),
    Case(
        "a paragraph after a list that says then summarise",
        "- Analyse the logs\n- Analyse the metrics\n\nThen summarise everything.",
        ["Analyse the logs", "Analyse the metrics", "Then summarise everything"],
        {
            ("Then summarise everything", "Analyse the logs"),
            ("Then summarise everything", "Analyse the metrics"),
        },
        True,
        aggregation="Then summarise everything",
    ),
    Case(
        "a second list introduced by then",
        "Prepare:\n- Order the parts\n- Book the room\n\nThen, in any order:\n"
        "- Assemble the rig\n- Invite the team",
        ["Order the parts", "Book the room", "Assemble the rig", "Invite the team"],
        {
            ("Assemble the rig", "Order the parts"),
            ("Assemble the rig", "Book the room"),
            ("Invite the team", "Order the parts"),
            ("Invite the team", "Book the room"),
        },
        True,
    ),
    Case(
        "nested items stay inside their parent",
        "- Set up CI\n  - add the lint job\n  - add the test job\n- Set up CD",
        ["Set up CI", "Set up CD"],
        set(),
        True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_split(case: Case) -> None:
    plan = split(case.description)
    assert [subtask.title for subtask in plan.subtasks] == case.titles
    assert edges(plan) == case.edges
    assert plan.parallelizable is case.parallelizable
    assert aggregation_title(plan) == case.aggregation
    assert case.reason in plan.reason
    assert plan.splitter == "builtin"


ONE_SUBTASK = [
    ("", "One sub-task: the description is empty."),
    ("   \n\n  ", "One sub-task: the description is empty."),
    (
        "Refactor the authentication module so that it uses the new token service.",
        "One sub-task: the description has no list, headings or ordering words.",
    ),
    (
        "The service is slow. Profile it and fix the hot spots.",
        "One sub-task: the description has no list, headings or ordering words.",
    ),
    (
        "If the build fails, then open an issue.",
        "One sub-task: the description has no list, headings or ordering words.",
    ),
    (
        "Compare the latency for Python, Go and Rust.",
        "One sub-task: the description has no list, headings or ordering words.",
    ),
    (
        "```\n# not a heading\n- not an item\n- nor this\n```",
        "One sub-task: the description has no list, headings or ordering words.",
    ),
    ("Only this:\n- Rotate the keys", "One sub-task: the description has only one item."),
]


@pytest.mark.parametrize(("description", "reason"), ONE_SUBTASK)
def test_one_subtask(description: str, reason: str) -> None:
    plan = split(description, title="Keep it whole")
    assert plan.reason == reason
    assert plan.parallelizable is False
    assert plan.aggregation_local_id == ""
    [subtask] = plan.subtasks
    assert (subtask.local_id, subtask.title, subtask.description) == (
        "main",
        "Keep it whole",
        description,
    )
    assert subtask.depends_on == ()


def test_bullets_that_are_all_independent_give_the_reason_of_the_example() -> None:
    plan = split("- Crawl site A\n- Crawl site B\n- Crawl site C")
    assert plan.reason == (
        "Split into 3 sub-tasks, one per bulleted item; they do not depend on each other."
    )


def test_description_is_the_items_full_text_and_ids_are_steps() -> None:
    plan = split("- Set up CI\n  - add the lint job\n  - add the test job\n- Set up CD")
    assert [subtask.local_id for subtask in plan.subtasks] == ["step-1", "step-2"]
    assert plan.subtasks[0].description == "Set up CI\n- add the lint job\n- add the test job"
    assert plan.subtasks[1].description == "Set up CD"


def test_a_paragraph_between_numbered_steps_belongs_to_the_step_above() -> None:
    plan = split("Step 1: Download\n\nIt is on the mirror.\n\nStep 2: Unpack")
    assert [s.description for s in plan.subtasks] == ["Download\n\nIt is on the mirror.", "Unpack"]


def test_section_description_is_its_body() -> None:
    plan = split("## Build\nCompile the binaries.\nStrip them.\n## Ship\nUpload them.")
    assert [(s.title, s.description) for s in plan.subtasks] == [
        ("Build", "Compile the binaries.\nStrip them."),
        ("Ship", "Upload them."),
    ]


def test_capability_tags_become_required_capabilities_and_leave_the_title() -> None:
    plan = split(
        "- Train the model [capability: GPU]\n- Write the docs (needs: Technical Writing, review)"
    )
    assert [(s.title, s.required_capabilities) for s in plan.subtasks] == [
        ("Train the model", ("gpu",)),
        ("Write the docs", ("review", "technical-writing")),
    ]


def test_section_tag_applies_to_every_item_of_the_section() -> None:
    plan = split("## Benchmarks [capability: gpu]\n- Run A\n- Run B\n## Docs\nWrite them.")
    assert [s.required_capabilities for s in plan.subtasks] == [("gpu",), ("gpu",), ()]


def test_split_is_deterministic() -> None:
    for case in CASES:
        assert split(case.description) == split(case.description)


def test_long_items_get_short_titles() -> None:
    long_item = "Investigate " + "the slow query " * 40
    plan = split(f"- {long_item}\n- {'x' * 400}\n- Short one")
    titles = [subtask.title for subtask in plan.subtasks]
    assert all(0 < len(title) <= 256 for title in titles)
    assert titles[0].startswith("Investigate the slow query") and titles[0].endswith("…")
    assert titles[2] == "Short one"
    assert plan.subtasks[0].description == long_item.strip()


@pytest.mark.parametrize("marker", ["- ", "{n}. "])
def test_more_than_the_cap_is_merged_into_the_last_subtask(marker: str) -> None:
    count = MAX_SUBTASKS + 500
    lines = [marker.format(n=n + 1) + f"Task number {n}" for n in range(count)]
    plan = split("\n".join(lines))
    assert len(plan.subtasks) == MAX_SUBTASKS
    last = plan.subtasks[-1]
    assert last.title == "Task number 999 (and 500 more items)"
    assert "Task number 999" in last.description and "Task number 1499" in last.description
    assert "the last sub-task merges the 501 beyond the first 999" in plan.reason
    if marker == "- ":
        assert last.depends_on == ()
    else:
        assert last.depends_on == ("step-999",)


def all_plans() -> list[Plan]:
    descriptions = [case.description for case in CASES] + [d for d, _ in ONE_SUBTASK]
    descriptions.append(
        "\n".join(f"{n + 1}. Item {n} after step {n // 2 + 1}" for n in range(1200))
    )
    return [split(description) for description in descriptions]


def test_every_plan_is_well_formed() -> None:
    for plan in all_plans():
        assert 1 <= len(plan.subtasks) <= MAX_SUBTASKS
        ids = [subtask.local_id for subtask in plan.subtasks]
        assert len(set(ids)) == len(ids)
        seen: set[str] = set()
        for subtask in plan.subtasks:
            assert LOCAL_ID.fullmatch(subtask.local_id)
            assert 0 < len(subtask.title) <= 256
            assert set(subtask.depends_on) <= seen, "depends_on must name earlier sub-tasks"
            assert all(CAPABILITY.fullmatch(name) for name in subtask.required_capabilities)
            assert subtask.input is None and subtask.max_attempts == 0
            seen.add(subtask.local_id)
        if plan.aggregation_local_id:
            assert plan.aggregation_local_id == ids[-1]
            assert set(plan.subtasks[-1].depends_on) == set(ids[:-1])


def test_parallelizable_follows_the_dependencies() -> None:
    for plan in all_plans():
        before: dict[str, set[str]] = {}
        for subtask in plan.subtasks:
            before[subtask.local_id] = set(subtask.depends_on).union(
                *(before[dependency] for dependency in subtask.depends_on)
            )
        ids = [subtask.local_id for subtask in plan.subtasks]
        chain = all(before[local_id] == set(ids[:index]) for index, local_id in enumerate(ids))
        assert plan.parallelizable is (not chain)


def test_builtin_splitter_is_a_splitter() -> None:
    splitter = BuiltinSplitter()
    assert isinstance(splitter, Splitter)
    assert splitter.name == "builtin"
