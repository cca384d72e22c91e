"""The daemons under test, one controller for all three benchmarks.

``Daemons(service, env, logdir, problems, sid)`` runs one daemon at a time
for SERVICE ("importd" or "machined") on the private bus, as WHO:

  ours       ``python -m importd|machined --pool /var/lib/machines``
             (imagepool.dev.service_argv), ready on READY=1 and the bus name
  reference  systemd 252, the host's /lib/systemd/systemd-importd|machined
  ref262     systemd 262 from Debian sid, chrooted into the sid root
             (``SidRoot``): ``chroot ROOT /usr/lib/systemd/systemd-NAME`` with
             a clean environment (PATH, DBUS_SYSTEM_BUS_ADDRESS); importd 262
             starts its workers (/usr/lib/systemd/systemd-pull, ...) by
             absolute path, which is why it runs chrooted

Each is an imagepool.dev.Service in a session of its own, started, waited
for until the bus name is owned by exactly its PID, and stopped by PID (its
process group is killed, leftover descendants too, and the bus name waited
for to be released).  ``ensure(who)`` starts it again if it has exited:
importd 262 exits after 30 s idle ("Idle for 30s, exiting.").

``Daemons.measure()`` returns a ``Usage``: while it runs, a ``TreeSampler``
thread reads /proc every 50 ms; ``Usage.finish()`` gives the daemon's own
VmHWM and CPU seconds, and its children's (xz, tar, systemd-pull, ...)
separately: peak VmHWM per command name, peak summed RSS overall and per
name.

``SidRoot(root).setup(cleanups)`` prepares the sid root once, in the
benchmark's private mount namespace, as /work/research/sid/scripts/ns-setup.sh
does: a tmpfs on ROOT/tmp and ROOT/run first, then /run/systemd (with the
private bus socket in /run/systemd/bench-bus, so at the same path inside)
bound onto ROOT/run/systemd, tmpfs on ROOT/var/lib/{portables,extensions,
confexts}, /proc bound and /sys, /dev rbound.  The pool (whatever is
mounted at /var/lib/machines right now) is bound onto ROOT/var/lib/machines
while a 262 daemon runs, and unbound when it stops, so that the pool can be
unmounted and mounted again in between.  Every mount is undone by the
clean-ups.

``Client`` is a blocking in-process sd-bus connection (the sdbus binding's
low-level API): ``timed(dest, path, iface, member, sig, *args)`` builds the
message before the clock starts and leaves the reply unparsed.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from common import (
    IMAGE_PREFIX,
    MB,
    POOL,
    REPO,
    Cleanups,
    descendants,
    kb,
    kill_leftovers,
    note,
    proc_cpu_seconds,
    proc_status,
    process_snapshot,
    run,
    umount,
    world,
)

OURS, REF252, REF262 = "ours", "reference", "ref262"
LABELS = {OURS: "ours", REF252: "systemd 252", REF262: "systemd 262"}
DEFAULT_SID_ROOT = REPO / ".cache" / "roots" / "sid"
SID_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SERVICES = {
    "importd": {"module": "importd", "bus": "org.freedesktop.import1",
                "ref252": "/lib/systemd/systemd-importd",
                "workers252": ("/lib/systemd/systemd-import", "/lib/systemd/systemd-pull"),
                "ref262": "/usr/lib/systemd/systemd-importd",
                "workers262": ("/usr/lib/systemd/systemd-import", "/usr/lib/systemd/systemd-pull")},
    "machined": {"module": "machined", "bus": "org.freedesktop.machine1",
                 "ref252": "/lib/systemd/systemd-machined", "workers252": (),
                 "ref262": "/usr/lib/systemd/systemd-machined", "workers262": ()},
}


def who_list(refs: list[str]) -> list[str]:
    """ours, then the references asked for ("252", "262") in that order."""
    return [OURS] + [REF252 for r in refs if r == "252"] + [REF262 for r in refs if r == "262"]


def block_order(i: int, who: list[str]) -> list[str]:
    """WHO in round I: as it is in even rounds, reversed in odd ones."""
    return list(who) if i % 2 == 0 else list(who)[::-1]


def owner_pid(env: dict[str, str], name: str) -> int | None:
    r = subprocess.run(["busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", name],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    try:
        return int(r.stdout.split()[1])
    except (IndexError, ValueError):
        return None


# --- the sid root --------------------------------------------------------------------


class SidRoot:
    """Debian sid's systemd 262, run chrooted into ROOT (see the module docstring)."""

    def __init__(self, root: Path = DEFAULT_SID_ROOT) -> None:
        self.link = Path(root)
        self.root = Path(os.path.realpath(root))
        self.ready = False
        self.pool_bound = False
        self.cleanups: Cleanups | None = None

    def missing(self, service: str) -> str | None:
        """Why SERVICE's 262 cannot run, or None."""
        spec = SERVICES[service]
        for binary in (spec["ref262"], *spec["workers262"]):
            if not os.access(self.root / binary.lstrip("/"), os.X_OK):
                return f"{self.link}{binary} is missing (the sid root is built by the Makefile)"
        return None

    def version(self) -> str | None:
        r = subprocess.run(["chroot", str(self.root), "/usr/bin/systemctl", "--version"], capture_output=True,
                           text=True, env={"PATH": SID_PATH})
        return r.stdout.splitlines()[0].strip() if r.returncode == 0 and r.stdout else None

    def _mount(self, what: str, argv: list[str], target: Path, recursive: bool = False) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run(["mount", *argv, str(target)])
        self.cleanups.push(f"umount {target} ({what})", lambda: umount(target, recursive=recursive))

    def setup(self, cleanups: Cleanups) -> None:
        """Once, after setup_namespace (the /run/systemd tmpfs) in the private namespace."""
        if self.ready:
            return
        self.cleanups = cleanups
        r = self.root
        self._mount("tmpfs", ["-t", "tmpfs", "tmpfs"], r / "tmp")
        self._mount("tmpfs", ["-t", "tmpfs", "-o", "mode=755", "tmpfs"], r / "run")
        (r / "run/lock").mkdir(exist_ok=True)
        self._mount("bind", ["--bind", "/run/systemd"], r / "run/systemd")
        for d in ("portables", "extensions", "confexts"):
            self._mount("tmpfs", ["-t", "tmpfs", "tmpfs"], r / "var/lib" / d)
        (r / "var/lib/machines").mkdir(parents=True, exist_ok=True)
        self._mount("bind", ["--bind", "/proc"], r / "proc")
        self._mount("rbind", ["--rbind", "/sys"], r / "sys", recursive=True)
        self._mount("rbind", ["--rbind", "/dev"], r / "dev", recursive=True)
        self.cleanups.push("unbind the pool from the sid root", self.unbind_pool)
        self.ready = True

    def bind_pool(self) -> None:
        if not self.pool_bound:
            run(["mount", "--bind", str(POOL), str(self.root / "var/lib/machines")])
            self.pool_bound = True

    def unbind_pool(self) -> None:
        if self.pool_bound:
            self.pool_bound = False
            umount(self.root / "var/lib/machines")

    def argv(self, binary: str) -> list[str]:
        return ["chroot", str(self.root), binary]

    def env(self, bus_address: str) -> dict[str, str]:
        return {"PATH": SID_PATH, "DBUS_SYSTEM_BUS_ADDRESS": bus_address, "SYSTEMD_LOG_TARGET": "console",
                "SYSTEMD_LOG_LEVEL": "info", "LANG": "C.UTF-8"}


# --- measuring ---------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples a daemon and its descendants every INTERVAL seconds: the
    daemon's VmHWM; the children's peak VmHWM per command name, and the peak
    of their summed VmRSS (all of them, and per command name)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self._halt = threading.Event()
        self.child_hwm_kb: dict[str, int] = {}
        self.children_rss_peak_kb = 0
        self.children_rss_peak_by_name_kb: dict[str, int] = {}
        self.daemon_hwm_kb = 0
        self.samples = 0

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        self.samples += 1
        total = 0
        by_name: dict[str, int] = {}
        own = proc_status(self.pid)
        for child in descendants(self.pid):
            st = proc_status(child)
            if not st:
                continue
            name = st.get("Name", "?")
            if name == own.get("Name"):
                continue  # forked, not yet exec()ed: the daemon's own pages, shared
            rss = kb(st.get("VmRSS"))
            total += rss
            by_name[name] = by_name.get(name, 0) + rss
            self.child_hwm_kb[name] = max(self.child_hwm_kb.get(name, 0), kb(st.get("VmHWM")))
        self.children_rss_peak_kb = max(self.children_rss_peak_kb, total)
        for name, v in by_name.items():
            self.children_rss_peak_by_name_kb[name] = max(self.children_rss_peak_by_name_kb.get(name, 0), v)
        self.daemon_hwm_kb = max(self.daemon_hwm_kb, kb(own.get("VmHWM")))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _mb(v_kb: int) -> float:
    return round(v_kb * 1024 / MB, 1)


class Usage:
    """What one daemon used from now until finish(); children counted separately."""

    def __init__(self, daemons: Daemons, interval: float = 0.05) -> None:
        self.daemons = daemons
        self.pid = daemons.pid
        self.cpu0 = proc_cpu_seconds(self.pid)
        self.cpu0_self = proc_cpu_seconds(self.pid, children=False)
        self.sampler = TreeSampler(self.pid, interval)
        self.sampler.start()
        self.result: dict | None = None

    def finish(self) -> dict:
        """cpu_seconds (daemon + children waited for), cpu_self_seconds,
        daemon_hwm_mb, children_hwm_mb {name: MB}, children_rss_peak_mb,
        children_rss_peak_by_name_mb, alive."""
        if self.result is not None:
            return self.result
        self.sampler.stop()
        alive = self.daemons.pid == self.pid
        res: dict = {"alive": alive}
        if alive:
            self.sampler.sample()
            res["cpu_seconds"] = round(proc_cpu_seconds(self.pid) - self.cpu0, 2)
            res["cpu_self_seconds"] = round(proc_cpu_seconds(self.pid, children=False) - self.cpu0_self, 3)
            res["daemon_hwm_mb"] = _mb(kb(proc_status(self.pid).get("VmHWM")))
        else:
            res["daemon_hwm_mb"] = _mb(self.sampler.daemon_hwm_kb)
        s = self.sampler
        res["children_hwm_mb"] = {n: _mb(v) for n, v in s.child_hwm_kb.items()}
        res["children_rss_peak_mb"] = _mb(s.children_rss_peak_kb)
        res["children_rss_peak_by_name_mb"] = {n: _mb(v) for n, v in s.children_rss_peak_by_name_kb.items()}
        self.result = res
        return res


# --- the controller --------------------------------------------------------------------


class Daemons:
    """One daemon of SERVICE at a time on the private bus: ours, systemd 252's or 262's."""

    def __init__(self, service: str, env: dict[str, str], logdir: Path, problems: list[str],
                 sid: SidRoot | None = None) -> None:
        self.service = service
        self.spec = SERVICES[service]
        self.bus_name = self.spec["bus"]
        self.env = env
        self.logdir = logdir
        self.problems = problems
        self.sid = sid
        self.current: world.Service | None = None
        self.who: str | None = None
        self.log_offset = 0
        self.starts = {OURS: 0, REF252: 0, REF262: 0}

    @staticmethod
    def available(service: str, who: str, sid: SidRoot | None) -> str | None:
        """Why WHO's SERVICE cannot run here, or None."""
        spec = SERVICES[service]
        if who == REF252:
            for binary in (spec["ref252"], *spec["workers252"]):
                if not os.access(binary, os.X_OK):
                    return f"{binary} is missing"
        if who == REF262:
            return sid.missing(service) if sid else "no sid root"
        return None

    def log(self, who: str) -> Path:
        return self.logdir / f"{who}-{self.service}.log"

    def argv(self, who: str) -> tuple[list[str], dict[str, str]]:
        if who == OURS:
            return world.service_argv(self.spec["module"], POOL, IMAGE_PREFIX), self.env
        if who == REF252:
            return [self.spec["ref252"]], self.env
        assert self.sid is not None
        return self.sid.argv(self.spec["ref262"]), self.sid.env(self.env["DBUS_SYSTEM_BUS_ADDRESS"])

    def start(self, who: str, timeout: float = 120) -> int:
        self.stop()
        world.wait_for(lambda: owner_pid(self.env, self.bus_name) is None, 15, f"{self.bus_name} to be released",
                       0.05)
        if who == REF262:
            self.sid.bind_pool()
        argv, env = self.argv(who)
        log = self.log(who)
        self.log_offset = log.stat().st_size if log.exists() else 0
        svc = world.Service(argv, env, log)
        try:
            # Ours says READY=1 through NOTIFY_SOCKET; the references are chrooted or
            # not told to: for all, the bus name owned by exactly this process.
            svc.start(timeout=timeout, notify=(who == OURS))
        except BaseException:
            if who == REF262:
                self.sid.unbind_pool()
            raise
        self.current, self.who = svc, who
        self.starts[who] += 1
        pid = svc.proc.pid
        deadline = time.monotonic() + timeout
        while owner_pid(self.env, self.bus_name) != pid:
            if svc.proc.poll() is not None:
                rc = svc.proc.returncode
                self.stop()
                raise RuntimeError(f"{LABELS[who]} {self.service} exited with {rc} at start-up; see {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{LABELS[who]} {self.service} did not take {self.bus_name}")
            time.sleep(0.02)
        return pid

    def ensure(self, who: str) -> int:
        """WHO running: started again if it has exited (importd 262 exits after 30 s idle)."""
        if self.who == who and self.pid is not None:
            return self.pid
        if self.who == who and self.current is not None:
            note(f"{LABELS[who]} {self.service} had exited (rc {self.current.proc.returncode}); starting it again")
        return self.start(who)

    @property
    def pid(self) -> int | None:
        if self.current and self.current.proc and self.current.proc.poll() is None:
            return self.current.proc.pid
        return None

    def measure(self, interval: float = 0.05) -> Usage:
        return Usage(self, interval)

    def snapshot(self) -> list[dict]:
        return process_snapshot(self.current.proc.pid) if self.current and self.current.proc else []

    def stop(self) -> None:
        if self.current is None:
            return
        svc, who = self.current, self.who
        self.current = self.who = None
        snap = process_snapshot(svc.proc.pid) if svc.proc else []
        try:
            rc = svc.stop()
            killed = kill_leftovers(snap[1:])
            if killed:
                self.problems.append(f"{LABELS[who]} {self.service} left children behind, killed: {', '.join(killed)}")
            if who == OURS:
                if rc not in (0, None):
                    self.problems.append(f"our {self.service} exited with status {rc} when stopped")
                text = self.new_log_text(who)
                if "Traceback" in text:
                    self.problems.append(f"our {self.service} logged a traceback:\n" + text[-3000:])
            world.wait_for(lambda: owner_pid(self.env, self.bus_name) is None, 10,
                           f"{self.bus_name} to be released after stopping {LABELS[who]}", 0.02)
        finally:
            if who == REF262:
                self.sid.unbind_pool()

    def new_log_text(self, who: str) -> str:
        log = self.log(who)
        if not log.exists():
            return ""
        with open(log, errors="replace") as f:
            f.seek(self.log_offset)
            return f.read()


def log_findings(log: Path, limit: int = 40) -> list[str]:
    """Warnings, errors and tracebacks from one of our daemons' logs."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(("<0>", "<1>", "<2>", "<3>", "<4>")) or "Traceback" in line or "Error" in line:
            out.append(line)
    return out[:limit]


def daemon_path(service: str, who: str, sid: SidRoot | None) -> str:
    """What runs as WHO's SERVICE, as text."""
    spec = SERVICES[service]
    if who == OURS:
        return " ".join(world.service_argv(spec["module"], POOL, IMAGE_PREFIX))
    if who == REF252:
        return spec["ref252"]
    return f"chroot {sid.root if sid else '?'} {spec['ref262']}"


def references(service: str, refs: list[str], sid: SidRoot, notes: list[str]) -> list[str]:
    """ours plus the references of REFS that can run here (a note for each that cannot)."""
    who = [OURS]
    for w in who_list(refs)[1:]:
        why = Daemons.available(service, w, sid)
        if why:
            notes.append(f"{LABELS[w]}: {why}: not measured")
            note(notes[-1])
        else:
            who.append(w)
    return who


# --- an in-process D-Bus client ------------------------------------------------------------


class Client:
    """A blocking sd-bus connection of our own (sdbus low-level API)."""

    def __init__(self, timeout_s: float = 300) -> None:
        import sdbus

        self.bus = sdbus.sd_bus_open_system()
        try:
            self.bus.method_call_timeout_usec = int(timeout_s * 1_000_000)
        except (AttributeError, TypeError):
            pass

    def message(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args):
        msg = self.bus.new_method_call_message(dest, path, iface, member)
        if sig:
            msg.append_data(sig, *args)
        return msg

    def call(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args):
        return self.bus.call(self.message(dest, path, iface, member, sig, *args))

    def timed(self, dest: str, path: str, iface: str, member: str, sig: str = "", *args) -> tuple[float, object]:
        """(seconds, reply) of one call: the message is built before the clock starts, the reply not unpacked."""
        msg = self.message(dest, path, iface, member, sig, *args)
        t0 = time.perf_counter()
        reply = self.bus.call(msg)
        return time.perf_counter() - t0, reply
