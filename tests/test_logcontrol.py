"""org.freedesktop.LogControl1 of both services, through busctl (what
``systemctl service-log-level`` sets on a host with systemd): the level and
the target change what is logged at once; Varlink's io.systemd.service sees
the same level; only root may change them."""

from __future__ import annotations

import subprocess

import pytest

from imagepool import dev as world
from tests import sid
from tests.conftest import Daemons, Pool, busctl

SERVICES = {"machined": ("org.freedesktop.machine1", "/run/systemd/machine/io.systemd.Machine"),
            "importd": ("org.freedesktop.import1", "/run/systemd/io.systemd.Import")}
OBJECT = ("/org/freedesktop/LogControl1", "org.freedesktop.LogControl1")


def get(bus_name: str, prop: str) -> str:
    r = busctl("get-property", bus_name, *OBJECT, prop)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def set_(bus_name: str, prop: str, value: str, user: str | None = None) -> str:
    args = ["busctl", "--system", "set-property", bus_name, *OBJECT, prop, "s", value]
    if user:
        args = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *args]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    return f"rc={r.returncode} {r.stderr.strip()}"


@pytest.mark.parametrize("pool", ["plain"], indirect=True)
@pytest.mark.parametrize("service", ["machined", "importd"])
def test_log_level_and_target(pool: Pool, daemons: Daemons, service: str) -> None:
    bus_name, socket = SERVICES[service]
    daemons.start(service)
    log = daemons.log_of(service)
    assert get(bus_name, "LogLevel") == 's "info"'
    assert get(bus_name, "LogTarget") == 's "auto"'
    assert get(bus_name, "SyslogIdentifier") == f's "{service}"'
    # Debug lines appear at once when asked for (the Varlink server logs
    # each connection at debug level).
    sid.varlinkctl("call", socket, "io.systemd.service.Ping", "{}")
    assert "<7>" not in log.read_text()
    assert set_(bus_name, "LogLevel", "debug") == "rc=0 "
    assert get(bus_name, "LogLevel") == 's "debug"'
    rc, replies, _ = sid.call(socket, "io.systemd.service.GetLogLevel")
    assert replies == [{"level": 7}]
    sid.varlinkctl("call", socket, "io.systemd.service.Ping", "{}")
    world.wait_for(lambda: "<7>" in log.read_text(), 5, "debug lines")
    # And back, through Varlink this time.
    sid.call(socket, "io.systemd.service.SetLogLevel", {"level": 4})
    assert get(bus_name, "LogLevel") == 's "warning"'
    # Targets: no prefixes on "console", nothing on "null".
    assert set_(bus_name, "LogLevel", "info") == "rc=0 "
    assert set_(bus_name, "LogTarget", "console") == "rc=0 "
    before = len(log.read_text())
    assert set_(bus_name, "LogLevel", "info") == "rc=0 "  # logged without a prefix
    world.wait_for(lambda: "Log level set to info." in log.read_text()[before:], 5, "the console line")
    assert "<6>Log level set to info." not in log.read_text()[before:]
    assert set_(bus_name, "LogTarget", "null") == "rc=0 "
    before = len(log.read_text())
    assert set_(bus_name, "LogLevel", "debug") == "rc=0 "
    sid.varlinkctl("call", socket, "io.systemd.service.Ping", "{}")
    assert log.read_text()[before:] == ""
    assert set_(bus_name, "LogTarget", "journal") == "rc=0 "
    # Bad values and callers.
    assert set_(bus_name, "LogLevel", "loud").startswith("rc=1 ")
    assert set_(bus_name, "LogTarget", "paper").startswith("rc=1 ")
    world.wait_for(lambda: "Refused: Invalid log target 'paper'" in log.read_text(), 5, "the refusal")
    assert get(bus_name, "LogLevel") == 's "debug"'
