"""topics.md and hub/protocol/ describe the same wire: this keeps them in step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hub import protocol as p

DOC = (Path(__file__).resolve().parent.parent / "topics.md").read_text()


def _table_rows() -> dict[str, tuple[int, bool]]:
    section = DOC.split("## Topic table", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|[^|]*\|\s*(\d)\s*\|\s*(yes|no)\s*\|", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), m.group(3) == "yes")
    return rows


def _protocol_topics() -> dict[str, tuple[int, bool]]:
    t = p.Topics("P")
    u, d = "USER", "DEVICE"

    def doc_form(topic: str) -> str:
        return topic.replace(u, "{user}").replace(d, "{device}")

    out = {}
    for kind, (qos, retain) in p.DEVICE_TOPIC_QOS.items():
        out[doc_form(t.device(u, d, kind))] = (qos, retain)  # type: ignore[arg-type]
    for kind in p.USER_TOPIC_KINDS:
        out[doc_form(t.user(u, kind))] = (1, True)  # type: ignore[arg-type]
    out[doc_form(t.events(u))] = (1, False)
    out[doc_form(t.reply(u, d))] = (1, False)
    out[t.hub_status] = (1, True)
    return out


def test_topic_table_matches_the_protocol_module() -> None:
    assert _table_rows() == _protocol_topics()


def test_device_filter_is_documented() -> None:
    assert f"`{p.Topics('P').device_filter}`" in DOC


MODELS = {
    "conn": p.ConnPayload,
    "heartbeat": p.HeartbeatPayload,
    "activity": p.ActivityPayload,
    "set": p.SetPayload,
    "ack": p.AckPayload,
    "req": p.RequestPayload,
    "Hub -> device: reply": p.ReplyPayload,
    "state (retained)": p.UserStatePayload,
    "event (not retained)": p.EventPayload,
}


def _examples() -> list[tuple[str, str]]:
    out = []
    heading = ""
    for block in re.split(r"(^#{2,3} .*$)", DOC, flags=re.M):
        if re.match(r"^#{2,3} ", block):
            heading = block.lstrip("#").strip()
            continue
        for example in re.findall(r"```json\n(.*?)```", block, flags=re.S):
            out.append((heading, example))
    return out


def _wire_names(model: type[p.WireModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize(("heading", "example"), _examples())
def test_every_json_example_parses_with_its_model(heading: str, example: str) -> None:
    assert heading in MODELS, f"topics.md example under unknown heading {heading!r}"
    model = MODELS[heading]
    model.model_validate_json(example)
    unknown = set(json.loads(example)) - _wire_names(model)
    assert not unknown, f"{heading}: fields not in {model.__name__}: {unknown}"


def test_every_payload_model_has_an_example() -> None:
    assert {h for h, _ in _examples()} == set(MODELS)
