"""Debian's polkitd on the tests' private system bus, with rules of the
tests' own, and the questions it was asked.

polkitd honours DBUS_SYSTEM_BUS_ADDRESS.  It reads its actions from
/usr/share/polkit-1/actions and its rules from /etc/polkit-1/rules.d and
/usr/share/polkit-1/rules.d; all three get a tmpfs of their own in the
tests' mount namespace (the actions: our systemd/*.policy only, which must
name every action systemd's daemons ask for).  Every rule file starts with
one that logs each question (``polkit.log``, on polkitd's stdout) before
the tests' rules answer it; ``questions()`` reads them back.

Subjects: polkitd names them by user name, so the users the tests run as
are Debian's base-passwd ones, there on every Debian system.

polkitd 122 (Debian 12's and sid's) knows no "pidfd" in a unix-process
subject: systemd 262's daemons, which name a Varlink caller by pidfd only,
get polkit's Failed error for every Varlink caller that is not root (and
refuse it); only their D-Bus side can be compared under this polkitd.
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from imagepool import dev as world

POLKITD = Path("/usr/lib/polkit-1/polkitd")
RULES = Path("/etc/polkit-1/rules.d")
VENDOR_RULES = Path("/usr/share/polkit-1/rules.d")
ACTIONS = Path("/usr/share/polkit-1/actions")
POLICIES = Path(__file__).resolve().parent.parent / "systemd"
BUS_NAME = "org.freedesktop.PolicyKit1"

# Who the tests run as (uid, polkit's user name).
GRANTED = (65534, "nobody")  # org.freedesktop.machine1.* and import1.* but for what DENIED_FOR_GRANTED says
DENIED = (1, "daemon")  # polkit says no to everything
CHALLENGED = (2, "bin")  # no rule: the policy's defaults, auth_admin for a subject without a session

QUESTION = "QUESTION "

# The first rule logs the question: the action with its details, the subject.
LOG_RULE = """polkit.addRule(function(action, subject) {
    var details = [];
    for (var key in action) {
        if (key.indexOf("_detail_") == 0)
            details.push(key.substr(8) + "=" + action[key]);
    }
    details.sort();
    polkit.log("QUESTION_MARK" + JSON.stringify({"action": action.id, "details": details, "user": subject.user}));
});
""".replace("QUESTION_MARK", QUESTION)

# What the tests' users are answered; a function of the action, its details and the subject.
TEST_RULES = """polkit.addRule(function(action, subject) {
    var ours = action.id.indexOf("org.freedesktop.machine1.") == 0 ||
               action.id.indexOf("org.freedesktop.import1.") == 0;
    if (!ours)
        return polkit.Result.NOT_HANDLED;
    if (subject.user == "daemon")
        return polkit.Result.NO;
    if (subject.user == "nobody") {
        // Per action and per detail: one image may not be removed, shells on the host are refused.
        if (action.id == "org.freedesktop.machine1.manage-images" && action.lookup("verb") == "remove" &&
            action.lookup("image") == "keep")
            return polkit.Result.NO;
        if (action.id == "org.freedesktop.machine1.host-shell")
            return polkit.Result.NO;
        return polkit.Result.YES;
    }
    return polkit.Result.NOT_HANDLED;
});
"""


@dataclass(frozen=True)
class Question:
    action: str
    details: tuple[str, ...]  # KEY=VALUE, sorted
    user: str


class Polkitd:
    """polkitd on BUS with our actions and RULES (JavaScript), logging to LOG.
    Mounts its directories on start() and unmounts them on close()."""

    def __init__(self, bus: world.PrivateBus, log: Path, rules: str = TEST_RULES) -> None:
        self.bus = bus
        self.log = log
        self.rules = rules
        self.proc: subprocess.Popen[bytes] | None = None
        self.mounted: list[Path] = []
        self._seen = 0

    def _mount(self, path: Path, mode: int, owner: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"mode={mode:o}", "tmpfs", str(path)], check=True)
        self.mounted.append(path)
        shutil.chown(path, owner, "root")

    def open(self) -> Polkitd:
        try:
            self._mount(RULES, 0o700, "polkitd")
            self._mount(VENDOR_RULES, 0o700, "polkitd")
            self._mount(ACTIONS, 0o755, "root")
            for policy in sorted(POLICIES.glob("*.policy")):
                shutil.copy(policy, ACTIONS / policy.name)
            (RULES / "00-log.rules").write_text(LOG_RULE)
            (RULES / "50-tests.rules").write_text(self.rules)
            for f in RULES.iterdir():
                shutil.chown(f, "polkitd", "root")
        except BaseException:
            self.close()
            raise
        return self

    def start(self) -> Polkitd:
        """Start polkitd; returns once it owns its bus name."""
        assert self.proc is None
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(POLKITD)], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=out, start_new_session=True)
        try:
            world.wait_for(lambda: self._running() and world.name_has_owner(env, BUS_NAME), 20, BUS_NAME, 0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"polkitd exited with {self.proc.returncode}:\n{self.log.read_text()}")
        return True

    def stop(self) -> None:
        if self.proc is not None:
            world.stop_process(self.proc)
            self.proc = None

    def close(self) -> None:
        self.stop()
        while self.mounted:
            subprocess.run(["umount", str(self.mounted.pop())], check=False)

    def questions(self) -> list[Question]:
        """The questions asked since the last call, in order."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = []
        for line in text.splitlines():
            at = line.find(QUESTION)
            if at >= 0:
                q = json.loads(line[at + len(QUESTION):])
                found.append(Question(q["action"], tuple(q["details"]), q["user"]))
        new, self._seen = found[self._seen:], len(found)
        return new


def as_user(uid: int, argv: list[str]) -> list[str]:
    """ARGV run as UID (and its primary group), without supplementary groups."""
    gid = pwd.getpwuid(uid).pw_gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def user_name(uid: int) -> str:
    return pwd.getpwuid(uid).pw_name
