"""A stand-in for systemd's manager on the private test bus.

    python tests/fake_systemd1.py DIRECTORY

Owns org.freedesktop.systemd1 and serves the few Manager methods machined
uses.  Every call is appended to DIRECTORY/calls.json (method, arguments,
as JSON).  StartTransientUnit remembers the unit's PIDs (and moves them
into <Slice>/<unit> of the cgroup v2 hierarchy when DIRECTORY/place says
"yes") and emits JobRemoved shortly after replying, with the result read
from DIRECTORY/result ("done" unless the file says otherwise) after the
delay read from DIRECTORY/delay (seconds, 0.1 by default); a transient
service with ExecStart is run right away on the fds it was given.  StartUnit
only records.  StopUnit sends
SIGTERM to the unit's PIDs, KillUnit the given signal.  Like systemd, job
signals go to everybody (systemd sends them to subscribers and to the job's
requester).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
from typing import Any

import sdbus
from sdbus import DbusFailedError, DbusInterfaceCommonAsync, dbus_method_async, dbus_signal_async

PATH = "/org/freedesktop/systemd1"


class NoSuchUnit(DbusFailedError):
    dbus_error_name = "org.freedesktop.systemd1.NoSuchUnit"


class AlreadySubscribed(DbusFailedError):
    dbus_error_name = "org.freedesktop.systemd1.AlreadySubscribed"


def _pid_of_pidfd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise ValueError(f"fd {fd} is no pidfd")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return list(value)
    return value


class FakeManager(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Manager"):
    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.calls: list[dict[str, Any]] = []
        self.units: dict[str, list[int]] = {}
        self.subscribers: set[str] = set()
        self.next_job = 1

    def _setting(self, name: str, default: str) -> str:
        try:
            with open(os.path.join(self.directory, name)) as f:
                return f.read().strip() or default
        except FileNotFoundError:
            return default

    def _record(self, method: str, *args: Any) -> None:
        message = sdbus.get_current_message()
        self.calls.append({"method": method, "args": _jsonable(args), "sender": message.sender})
        path = os.path.join(self.directory, "calls.json")
        with open(path + ".new", "w") as f:
            json.dump(self.calls, f)
        os.rename(path + ".new", path)

    def _new_job(self, unit: str, result: str, delay: float) -> str:
        job_id = self.next_job
        self.next_job += 1
        path = f"{PATH}/job/{job_id}"
        asyncio.get_running_loop().call_later(delay, self._job_done, job_id, path, unit, result)
        return path

    def _job_done(self, job_id: int, path: str, unit: str, result: str) -> None:
        # To subscribers and to the job's requester, as systemd: here simply
        # to everybody.
        self.job_removed.emit((job_id, path, unit, result))

    @staticmethod
    def _signal(pids: list[int], signo: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, signo)
            except ProcessLookupError:
                pass

    @dbus_method_async("", "", method_name="Subscribe")
    async def subscribe(self) -> None:
        sender = sdbus.get_current_message().sender or ""
        self._record("Subscribe")
        if sender in self.subscribers:
            raise AlreadySubscribed("Client is already subscribed.")
        self.subscribers.add(sender)

    def _place(self, name: str, values: dict[str, Any], pids: list[int]) -> None:
        """If DIRECTORY/place says "yes": move the scope's PIDs into
        <Slice>/<name> of the cgroup v2 hierarchy at /sys/fs/cgroup, as
        systemd would (the test removes the directories)."""
        root = "/sys/fs/cgroup"
        if self._setting("place", "no") != "yes":
            return
        path = os.path.join(root, values.get("Slice", "system.slice"), name)
        os.makedirs(path, exist_ok=True)
        for pid in pids:
            try:
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except OSError:
                pass

    @dbus_method_async("ss", "o", method_name="StartUnit")
    async def start_unit(self, name: str, mode: str) -> str:
        self._record("StartUnit", name, mode)
        return self._new_job(name, "done", 0.05)

    @staticmethod
    def _exec_service(values: dict[str, Any]) -> None:
        """A service with ExecStart and fds for its stdio: run it (here, as
        whoever runs this) with its Environment, as session leader on the tty."""
        tty = os.dup(values["StandardInputFileDescriptor"])
        path, argv, _ = values["ExecStart"][0]
        env = dict(item.split("=", 1) for item in values.get("Environment", []))

        def session() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        try:
            subprocess.Popen(argv, executable=path, stdin=tty, stdout=tty, stderr=tty, env=env,
                             preexec_fn=session)
        finally:
            os.close(tty)
            # Like systemd, keep no copy of the terminal (its hangup ends the
            # client's session); the message closes its fds later: /dev/null.
            null = os.open(os.devnull, os.O_RDWR)
            for key in ("StandardInputFileDescriptor", "StandardOutputFileDescriptor", "StandardErrorFileDescriptor"):
                os.dup2(null, values[key])
            os.close(null)

    @dbus_method_async("ssa(sv)a(sa(sv))", "o", method_name="StartTransientUnit")
    async def start_transient_unit(self, name: str, mode: str, properties: list, aux: list) -> str:
        self._record("StartTransientUnit", name, mode, properties, aux)
        values = {key: value for key, (_signature, value) in properties}
        if name.endswith(".service") and "ExecStart" in values:
            self._exec_service(values)
            return self._new_job(name, "done", 0.05)
        pids: list[int] = []
        for key, (signature, value) in properties:
            if key == "PIDs" and signature == "au":
                pids.extend(value)
            elif key == "PIDFDs" and signature == "ah":  # systemd-nspawn 26x
                pids.extend(_pid_of_pidfd(fd) for fd in value)
        result = self._setting("result", "done")
        if result == "done":
            self.units[name] = pids
            self._place(name, values, pids)
        return self._new_job(name, result, float(self._setting("delay", "0.1")))

    def _unit_pids(self, name: str) -> list[int]:
        """A unit started here, or one with a cgroup of its name below a
        slice of the cgroup v2 hierarchy (as if systemd had started it)."""
        if name in self.units:
            return self.units[name]
        root = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            for slice_ in os.listdir(root):
                procs = os.path.join(root, slice_, name, "cgroup.procs")
                if slice_.endswith(".slice") and os.path.exists(procs):
                    with open(procs) as f:
                        return [int(pid) for pid in f.read().split()]
        raise NoSuchUnit(f"Unit {name} not loaded.")

    @dbus_method_async("s", "", method_name="UnrefUnit")
    async def unref_unit(self, name: str) -> None:
        self._record("UnrefUnit", name)

    @dbus_method_async("ss", "o", method_name="StopUnit")
    async def stop_unit(self, name: str, mode: str) -> str:
        self._record("StopUnit", name, mode)
        self._signal(self._unit_pids(name), signal.SIGTERM)
        self.units.pop(name, None)
        return self._new_job(name, "done", 0.05)

    @dbus_method_async("ssi", "", method_name="KillUnit")
    async def kill_unit(self, name: str, whom: str, signo: int) -> None:
        self._record("KillUnit", name, whom, signo)
        self._signal(self._unit_pids(name), signo)

    @dbus_signal_async("uoss", signal_name="JobRemoved", signal_args_names=["id", "job", "unit", "result"])
    def job_removed(self) -> tuple[int, str, str, str]:
        raise NotImplementedError


async def main(directory: str) -> None:
    bus = sdbus.sd_bus_open_system()
    sdbus.set_default_bus(bus)
    manager = FakeManager(directory)
    manager.export_to_dbus(PATH)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signo in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signo, stop.set)
    await bus.request_name_async("org.freedesktop.systemd1", 0)
    await stop.wait()
    bus.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
