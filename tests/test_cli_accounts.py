"""Accounts the user made are never silently ignored (issue 11, defect 13).

With accounts configured, ``--broker auto`` must not pick an open broker that happens to be
listening (it knows none of them: anyone could read and set presence), and on an external
broker the banner and log say that the broker, not the hub, enforces access.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest

from hub.cli import main as hub_main
from hub.cli.users import users_main
from tests.support.hub_process import HubProcess
from tests.support.procs import MosquittoProcess

pytestmark = pytest.mark.slow


def _with_an_account(tmp_path: Path) -> list[str]:
    creds = tmp_path / "credentials.json"
    env = {"PRESENCE_CREDENTIALS": str(creds)}
    assert users_main(["add", "alice", "laptop", "--password", "pw-alice"], env=env,
                      out=StringIO()) == 0
    return ["--db", str(tmp_path / "presence.json"), "--credentials", str(creds)]


def test_auto_refuses_an_open_broker_that_does_not_know_the_accounts(
    mosquitto: MosquittoProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--broker", "auto", "--listen", f"127.0.0.1:{mosquitto.port}", *_with_an_account(tmp_path)]
    assert hub_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 account(s) are configured" in err[0]
    assert "export-mosquitto" in err[0] and "--broker embedded" in err[0]


def test_an_external_broker_with_accounts_says_who_enforces_access(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    args = ["--broker", f"mqtt://127.0.0.1:{mosquitto.port}", *_with_an_account(tmp_path)]
    hub = HubProcess(args, tmp_path).start()
    try:
        out = hub.output()
        assert "enforced by the external broker, not the hub" in out
        assert "apply to the embedded broker only" in out  # the log line says it too
        assert "-u WATCHER -P PASSWORD" in out  # the banner's commands log in
    finally:
        hub.close()
