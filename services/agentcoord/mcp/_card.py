"""An A2A agent card file (``agentcoord mcp --card FILE``) read into the SDK's terms."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentcoord.client import CardInfo, Skill


@dataclass(frozen=True)
class CardFile:
    """What a card file says: the agent's name, the rest of its card, its skills."""

    name: str
    info: CardInfo
    skills: tuple[Skill, ...]


def load_card(path: Path) -> CardFile:
    """Read an A2A AgentCard JSON file (camelCase keys, as A2A writes them).

    Its own A2A URL is ``supportedInterfaces[0].url`` (A2A 1.0) or ``url`` (0.3).
    The server checks the values when the agent registers.

    Raises:
        ValueError: the file is not JSON, not an object, or a skill lacks its id or name
            (the message names the file and the key).
    """
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path}: an agent card is a JSON object")
    skills = []
    for index, skill in enumerate(_list(card, "skills")):
        if not isinstance(skill, dict) or not skill.get("id") or not skill.get("name"):
            raise ValueError(f"{path}: skills[{index}] needs an id and a name")
        skills.append(
            Skill(
                id=str(skill["id"]),
                name=str(skill["name"]),
                description=str(skill.get("description", "")),
                tags=[str(tag) for tag in _list(skill, "tags")],
                examples=[str(example) for example in _list(skill, "examples")],
                input_modes=[str(mode) for mode in _list(skill, "inputModes")],
                output_modes=[str(mode) for mode in _list(skill, "outputModes")],
            )
        )
    interfaces = _list(card, "supportedInterfaces")
    url = interfaces[0].get("url", "") if interfaces and isinstance(interfaces[0], dict) else ""
    provider = card.get("provider")
    if not isinstance(provider, dict):
        provider = {}
    return CardFile(
        name=str(card.get("name", "")),
        info=CardInfo(
            description=str(card.get("description", "")),
            version=str(card.get("version", "")),
            provider_organization=str(provider.get("organization", "")),
            provider_url=str(provider.get("url", "")),
            a2a_url=str(url or card.get("url", "")),
        ),
        skills=tuple(skills),
    )


def _list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key, [])
    return value if isinstance(value, list) else []
