"""README's tour, replayed as written (tools/tour.py), and how its first step fails.

The replay takes its commands from README.md's blocks marked ``<!-- tour -->`` and checks each
promised output, so README and this test cannot drift apart: a command or a promise that
changes in one fails here until the other follows. One replay per broker, both at once (they
mostly wait on processes; a replay takes about 6 s).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.support.procs import find_binary, free_port
from tools.tour import README, make_run_command, tour_section, tour_steps

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "tools" / "tour.py"


def test_the_tour_blocks_and_make_run_are_what_the_replay_reads() -> None:
    readme = README.read_text()
    steps = tour_steps(readme)
    programs = [Path(step.argv[0]).name for step in steps]
    assert programs[:2] == ["make", "mosquitto_sub"], programs
    assert programs.count("presence-agent") >= 3 and "presence" in programs
    # the activity step the tour once lacked, and the command that shows it
    assert any("activity" in step.argv and "--channel" in step.argv for step in steps)
    assert any(step.argv[-3:] == ("activity", "--limit", "5") for step in steps)
    hub = make_run_command(Path(sys.executable).parent)
    assert Path(hub[0]).name == "presence-hub" and "--broker" in hub
    assert "--broker auto" in " ".join(tour_section(readme).split()), "item 5 of issue 15"


def test_the_readme_tour_replays_on_the_embedded_broker_and_on_mosquitto() -> None:
    find_binary("mosquitto", "apt-get install mosquitto")
    find_binary("mosquitto_sub", "apt-get install mosquitto-clients")
    runs = {
        broker: subprocess.Popen([sys.executable, str(TOUR), "--broker", broker], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for broker in ("embedded", "mosquitto")
    }
    try:
        outputs = {broker: proc.communicate(timeout=240)[0] for broker, proc in runs.items()}
    finally:
        for proc in runs.values():  # a hung replay (a timeout above) does not outlive the test
            if proc.poll() is None:
                proc.terminate()  # the replay then stops the hub, agents and broker it started
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for broker, proc in runs.items():
        print(outputs[broker])
        assert proc.returncode == 0, f"the tour on {broker}:\n{outputs[broker]}"
        assert "0 failed" in outputs[broker]


def _hub(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hub.cli", "--broker", "embedded",
                           "--storage", "memory", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def _one_clear_line(done: subprocess.CompletedProcess[str], address: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output and "amqtt" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("presence-hub:")]
    assert errors == [done.stderr.strip().splitlines()[-1]], output
    assert errors[0].startswith(f"presence-hub: cannot listen on {address}: the address is "
                                "already in use"), errors
    assert "--listen 127.0.0.1:1884" in errors[0]


def test_embedded_broker_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _hub(tmp_path, "--listen", f"127.0.0.1:{port}")
    _one_clear_line(done, f"127.0.0.1:{port}")


def test_a_busy_tls_port_is_named_as_the_one_taken(tmp_path: Path) -> None:
    openssl = find_binary("openssl", "apt-get install openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "hub.key", "-out",
                    "hub.pem", "-days", "1", "-subj", "/CN=localhost"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=60)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        tls_port = taken.getsockname()[1]
        done = _hub(tmp_path, "--listen", f"127.0.0.1:{free_port()}",
                    "--tls-listen", f"127.0.0.1:{tls_port}", "--tls-cert", "hub.pem",
                    "--tls-key", "hub.key")
    _one_clear_line(done, f"127.0.0.1:{tls_port}")
