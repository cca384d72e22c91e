"""Callers that are not root, authorized by Debian's polkitd (tests.polkit):
``nobody`` is granted (but for the removal of the image "keep" and shells on
the host), ``daemon`` is refused, ``bin`` is challenged (no rule: the
policies' auth_admin, and no agent).

- sid's machinectl and importctl (262) and busctl against our services and
  systemd 262's own, step by step: the same answers and the same questions
  to polkit (action and details);
- machinectl 252 against ours and systemd-machined 252 (tests.newer words
  the challenge as 262);
- the Varlink methods, ours only (systemd 262 cannot name a Varlink caller
  to this polkitd, tests.polkit): the error names and the questions systemd
  262 asks (checked with a polkit stand-in that logs them: the same actions
  and details), and the interactive flag passed on;
- without polkitd on the bus, what systemd does: everybody but root refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagepool import dev as world
from tests import newer, sid
from tests.conftest import Daemons, Pool
from tests.httpserver import TestServer
from tests.imagetree import make_os_tree, populate
from tests.polkit import CHALLENGED, DENIED, GRANTED, Polkitd, Question, as_user
from tests.test_clients_262 import clean

PLAIN = pytest.mark.parametrize("pool", ["plain"], indirect=True)  # quotas are not what is tested here

# The refused and the challenged first: the granted user's changes come last.
USERS = [("denied", DENIED[0]), ("challenged", CHALLENGED[0]), ("granted", GRANTED[0])]
FILES = Path("/run/systemd/test-files")  # readable by the users and by the chrooted daemons
MACHINE1 = ("org.freedesktop.machine1", "/org/freedesktop/machine1", "org.freedesktop.machine1.Manager")
INTERACTIVE = newer.INTERACTIVE_262


@pytest.fixture(scope="module")
def polkitd(bus: world.PrivateBus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Polkitd]:
    daemon = Polkitd(bus, tmp_path_factory.mktemp("polkitd") / "polkitd.log").open()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def files() -> Iterator[Path]:
    FILES.mkdir(parents=True, exist_ok=True)
    tree = FILES / "tree"
    make_os_tree(tree)
    subprocess.run(["tar", "--numeric-owner", "-C", str(tree), "-cf", str(FILES / "small.tar"), "."], check=True)
    with open(FILES / "disk.raw", "wb") as f:
        f.write(os.urandom(1 << 16))
        f.truncate(1 << 20)
    (FILES / "out").mkdir(mode=0o777)
    os.chmod(FILES / "out", 0o777)
    yield FILES
    shutil.rmtree(FILES)


def prepare(pool: Pool) -> None:
    pool.wipe()
    populate(pool.path, pool.btrfs)
    (pool.path / "keep").mkdir()


def questions(daemon: Polkitd) -> list[tuple[str, tuple[str, ...], str]]:
    return [(q.action, q.details, q.user) for q in daemon.questions()]


def run_as(uid: int, argv: list[str]) -> str:
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", SYSTEMD_LOG_COLOR="0")
    r = subprocess.run(as_user(uid, argv), capture_output=True, text=True, timeout=120, env=env)
    return f"{r.stdout}{r.stderr}rc={r.returncode}\n"


# --- the 262 clients and busctl, against ours and systemd 262 -----------------------------------------


def client_steps(daemon: Polkitd, pool: Pool, prefix: Path, url: str) -> list[tuple[str, Any]]:
    questions(daemon)  # forget the earlier ones
    steps: list[tuple[str, Any]] = []

    def step(name: str, uid: int, argv: list[str], output: bool = True) -> None:
        text = run_as(uid, argv)
        shown = f"$ {name.split(': ', 1)[1]}\n{text}"  # (tests.test_clients_262.clean knows "$ importctl pull-")
        steps.append((name, (clean(shown, pool, prefix) if output else shown.splitlines()[-1], questions(daemon))))

    for label, uid in USERS:
        image = "dir2" if label == "granted" else "dir1"  # the granted user renames dir1 first
        for verb in (["clone", "sv1", f"c-{label}"], ["rename", "dir1", "dir2"], ["read-only", image],
                     ["read-only", image, "false"], ["set-limit", image, "1G"], ["set-limit", "2G"],
                     ["remove", "keep"], ["remove", image], ["clean"]):
            step(f"{label}: machinectl {' '.join(verb)}", uid,
                 sid.argv("machinectl", "--no-pager", "--no-ask-password", *verb))
        for verb in (["pull-tar", "--verify=no", f"{url}/small.tar", f"p-{label}"],
                     ["pull-raw", "--verify=no", f"{url}/disk.raw", f"r-{label}"],
                     ["import-tar", str(FILES / "small.tar"), f"i-{label}"],
                     ["export-tar", "sv1", str(FILES / "out" / f"e-{label}.tar")],
                     ["cancel-transfer", "4711"]):
            step(f"{label}: importctl {' '.join(verb)}", uid,
                 sid.argv("importctl", "--no-pager", "--no-ask-password", "--class=machine", *verb))
        busctl = ["busctl", "--system", "--allow-interactive-authorization=no", "call"]
        # (the download caches it removes come in directory order: the answer's status only)
        step(f"{label}: busctl CleanPool", uid, [*busctl, *MACHINE1, "CleanPool", "s", "hidden"], output=False)
        # .host's os-release is this host's for ours and the sid root's for theirs: the answer's status only.
        step(f"{label}: busctl GetMachineOSRelease", uid,
             [*busctl, *MACHINE1, "GetMachineOSRelease", "s", ".host"], output=False)
        # systemd 262 asks "create-machines" (sic), an action its policy lacks: polkitd fails, everybody is refused.
        step(f"{label}: busctl CreateMachineEx", uid,
             [*busctl, *MACHINE1, "CreateMachineEx", "sa(sv)a(sv)", f"m-{label}", "1", "Class", "s", "container", "0"])
        if label != "granted":  # (a granted pull-oci would go to the network)
            step(f"{label}: busctl PullOci", uid,
                 [*busctl, "org.freedesktop.import1", "/org/freedesktop/import1", "org.freedesktop.import1.Manager",
                  "PullOci", "ssst", "docker.io/library/debian:latest", "deb", "machine", "0"])
    steps.append(("the pool after", sorted(n for n in os.listdir(pool.path) if not n.startswith("."))))
    steps.append(("exported", sorted(os.listdir(FILES / "out"))))
    return steps


@PLAIN
def test_clients_262_as_systemd_262(polkitd: Polkitd, daemons: Daemons, chroot: sid.Chroot, pool: Pool,
                                    tmp_path: Path, files: Path) -> None:
    both = sid.Both(("machined", "importd"), daemons, chroot, pool, tmp_path, lambda: prepare(pool), level="info")
    with TestServer(files) as server:
        url = server.url("")[:-1]
        ours = both.ours(lambda: client_steps(polkitd, pool, daemons.prefix, url))
        for entry in os.listdir(files / "out"):
            os.unlink(files / "out" / entry)
        theirs = both.theirs(lambda: client_steps(polkitd, pool, daemons.prefix, url))
    both.steps.same(ours, theirs)
    answers = dict(ours)
    # What each user was told, and asked about, as systemd does it:
    assert answers["granted: machinectl clone sv1 c-granted"] == (
        "$ machinectl clone sv1 c-granted\nrc=0",
        [("org.freedesktop.machine1.manage-images", ("image=sv1", "new_name=c-granted", "verb=clone"), "nobody")])
    assert answers["denied: machinectl clone sv1 c-denied"][0].endswith("Could not clone image: Access denied\nrc=1")
    assert answers["challenged: machinectl clone sv1 c-challenged"][0].endswith(
        f"Could not clone image: {INTERACTIVE}\nrc=1")
    assert answers["granted: machinectl remove keep"][0].endswith("Access denied\nrc=1")  # a rule on the detail
    assert answers["granted: machinectl set-limit dir2 1G"][1] == [
        ("org.freedesktop.machine1.manage-images", ("machine=dir2", "verb=set_limit"), "nobody")]
    assert answers["granted: busctl CleanPool"][1] == [
        ("org.freedesktop.machine1.manage-machines", ("mode=hidden", "verb=clean_pool"), "nobody")]
    assert answers["granted: busctl CreateMachineEx"] == (
        "$ busctl CreateMachineEx\nCall failed: Access denied\nrc=1", [])
    assert answers["granted: busctl GetMachineOSRelease"] == (
        "rc=0", [("org.freedesktop.machine1.inspect-machines", ("machine=.host", "verb=get_os_release"), "nobody")])
    for verb, action in (("pull-tar", "pull"), ("import-tar", "import"), ("export-tar", "export"),
                         ("cancel-transfer", "cancel")):
        key = next(k for k in answers if k.startswith(f"granted: importctl {verb}"))
        assert answers[key][1] == [(f"org.freedesktop.import1.{action}", (), "nobody")], key
    assert "No transfer by id 4711" in answers["granted: importctl cancel-transfer 4711"][0]
    # importctl makes the file before it asks: the refused are left with an empty one, as with systemd.
    assert answers["exported"] == ["e-challenged.tar", "e-denied.tar", "e-granted.tar"]
    pool_after = set(answers["the pool after"])
    assert {"c-granted", "i-granted", "keep", "p-granted", "r-granted.raw"} <= pool_after  # "keep" was refused
    assert not {"dir1", "dir2", "c-denied", "c-challenged", "p-denied", "i-challenged"} & pool_after


# --- machinectl 252 against ours and systemd 252 -----------------------------------------------------------


def machinectl_252_steps(daemon: Polkitd, ours: bool) -> list[tuple[str, Any]]:
    questions(daemon)
    steps: list[tuple[str, Any]] = []
    for label, uid in USERS:
        image = "dir2" if label == "granted" else "dir1"
        for verb in (["clone", "sv1", f"c-{label}"], ["rename", "dir1", "dir2"], ["read-only", image],
                     ["set-limit", image, "1G"], ["remove", "keep"], ["remove", image], ["clean"]):
            text = newer.machinectl_output(f"$ {' '.join(verb)}\n" + run_as(uid, ["machinectl", "--no-pager",
                                                                                  "--no-ask-password", *verb]),
                                           ours=ours)
            steps.append((f"{label}: {' '.join(verb)}", (newer.interactive_auth_message(text), questions(daemon))))
    return steps


@PLAIN
def test_machinectl_252_as_systemd_252(polkitd: Polkitd, daemons: Daemons, pool: Pool) -> None:
    results = []
    for ours in (True, False):
        prepare(pool)
        daemons.start("machined", ours=ours)
        try:
            results.append(machinectl_252_steps(polkitd, ours))
        finally:
            daemons.stop("machined")
    mine, theirs = results
    sid.Steps().same(mine, theirs)
    answers = dict(mine)
    assert answers["granted: set-limit dir2 1G"][1] == [  # "machine", in 252 already
        ("org.freedesktop.machine1.manage-images", ("machine=dir2", "verb=set_limit"), "nobody")]
    assert answers["challenged: clone sv1 c-challenged"][0].endswith(f"Could not clone image: {INTERACTIVE}\nrc=1")


# --- machines: terminate and kill (ours) --------------------------------------------------------------------


@PLAIN
def test_terminate_and_kill_a_machine(polkitd: Polkitd, daemons: Daemons, pool: Pool) -> None:
    daemons.start("machined")
    leader = subprocess.Popen(["sleep", "300"])
    try:
        r = subprocess.run(["busctl", "--system", "call", *MACHINE1, "RegisterMachine", "sayssus", "m1", "0", "svc",
                            "container", str(leader.pid), "/"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        questions(polkitd)
        kill = ["machinectl", "--no-ask-password", "kill", "--signal=SIGCONT", "m1"]
        terminate = ["machinectl", "--no-ask-password", "terminate", "m1"]
        assert run_as(DENIED[0], kill) == "Could not kill machine: Access denied\nrc=1\n"
        assert run_as(CHALLENGED[0], kill) == f"Could not kill machine: {INTERACTIVE}\nrc=1\n"
        assert run_as(GRANTED[0], kill) == "rc=0\n"
        assert run_as(DENIED[0], terminate) == "Could not terminate machine: Access denied\nrc=1\n"
        assert run_as(CHALLENGED[0], terminate) == f"Could not terminate machine: {INTERACTIVE}\nrc=1\n"
        assert run_as(GRANTED[0], terminate) == "rc=0\n"
        asked = [("org.freedesktop.machine1.manage-machines", ("machine=m1", f"verb={verb}"), user)
                 for verb in ("kill", "terminate") for user in ("daemon", "bin", "nobody")]
        assert questions(polkitd) == asked
        leader.wait(timeout=30)  # terminated with its machine
    finally:
        leader.kill()
        leader.wait()
        daemons.stop("machined")


# --- Varlink (ours) --------------------------------------------------------------------------------------


def varlink(uid: int, socket: str, method: str, params: dict[str, Any], *flags: str) -> tuple[int, list[Any], str]:
    return sid.call(socket, method, params, *flags, user=uid)


IMAGE_CALLS: list[tuple[str, dict[str, Any], tuple[str, ...], str, tuple[str, ...]]] = [
    # method, parameters, varlinkctl flags, action, details
    ("Clone", {"name": "sv1", "newName": "v1"}, (), "manage-images", ("image=sv1", "new_name=v1", "verb=clone")),
    ("Update", {"name": "dir1", "readOnly": True}, (), "manage-images", ("image=dir1", "verb=update")),
    ("SetPoolLimit", {"limit": 1 << 30}, (), "manage-images", ("verb=set_pool_limit",)),
    ("CleanPool", {"mode": "hidden"}, ("--more",), "manage-images", ("mode=hidden", "verb=clean_pool")),
    ("List", {"name": "sv1", "acquireMetadata": "yes"}, (), "inspect-images", ("name=sv1",)),
    ("List", {"acquireMetadata": "graceful"}, ("--more",), "inspect-images", ("name=n/a",)),
    ("Remove", {"name": "dir1"}, (), "manage-images", ("image=dir1", "verb=remove")),
]


# polkitd's own doing: where an action is not granted, it asks the rules about the actions that imply it
# (the policies' org.freedesktop.policykit.imply).
IMPLIED_BY = {"org.freedesktop.machine1.inspect-images": "org.freedesktop.machine1.manage-images",
              "org.freedesktop.machine1.inspect-machines": "org.freedesktop.machine1.manage-machines"}


def asked(action: str, details: tuple[str, ...], user: str, label: str) -> list[tuple[str, tuple[str, ...], str]]:
    """The questions polkitd's rules see when systemd asks ACTION for USER."""
    first = [(action, details, user)]
    if label != "granted" and action in IMPLIED_BY:
        return [*first, (IMPLIED_BY[action], details, user)]
    return first


@PLAIN
def test_varlink_answers_and_questions(polkitd: Polkitd, daemons: Daemons, pool: Pool, files: Path) -> None:
    prepare(pool)
    for name in ("machined", "importd"):
        daemons.start(name, env={"SYSTEMD_LOG_LEVEL": "debug"})
    images = "/run/systemd/machine/io.systemd.MachineImage"
    machines = "/run/systemd/machine/io.systemd.Machine"
    imports = "/run/systemd/io.systemd.Import"
    questions(polkitd)
    refusals = {"denied": "org.varlink.service.PermissionDenied",
                "challenged": "io.systemd.InteractiveAuthenticationRequired"}
    for label, uid in USERS:
        user = {"denied": "daemon", "challenged": "bin", "granted": "nobody"}[label]
        # varlinkctl --graceful=NAME: that error (and only that one) is a success.
        refused = (f"--graceful={refusals[label]}",) if label in refusals else ()
        for method, params, flags, action, details in IMAGE_CALLS:
            rc, _replies, err = varlink(uid, images, f"io.systemd.MachineImage.{method}", params, *flags, *refused)
            where = f"{label}: {method} {params}"
            if label == "granted":
                assert "Permission denied" not in err and "Interactive" not in err, (where, err)
            else:
                assert rc == 0, (where, err)
            assert questions(polkitd) == asked(f"org.freedesktop.machine1.{action}", details, user, label), where
        # Listing without metadata asks nobody.
        rc, replies, err = varlink(uid, images, "io.systemd.MachineImage.List", {"name": "sv1"})
        assert rc == 0 and replies[0]["name"] == "sv1", err
        assert questions(polkitd) == []
        rc, _replies, err = varlink(uid, machines, "io.systemd.Machine.List",
                                    {"name": ".host", "acquireMetadata": "yes"})
        assert questions(polkitd) == asked("org.freedesktop.machine1.inspect-machines", ("name=.host",), user, label)
        rc, _replies, err = varlink(uid, machines, "io.systemd.Machine.Open", {"name": ".host", "mode": "login"})
        assert questions(polkitd) == [("org.freedesktop.machine1.host-login", ("machine=.host", "verb=login"), user)]
        assert rc != 0  # granted or not: no getty on this host, or refused
        # Without "local", systemd's details stop after "remote".
        remote = "http://127.0.0.1:9/nothing.tar"
        rc, _replies, err = varlink(uid, imports, "io.systemd.Import.Pull",
                                    {"remote": remote, "class": "machine", "type": "tar", "verify": "no"}, *refused)
        assert questions(polkitd) == [("org.freedesktop.import1.pull", (f"remote={remote}",), user)]
        if label != "granted":
            assert rc == 0, err
        rc, _replies, err = varlink(uid, imports, "io.systemd.Import.Pull",
                                    {"remote": remote, "local": f"l-{label}", "class": "machine", "type": "raw"})
        assert questions(polkitd) == [("org.freedesktop.import1.pull",
                                       ("class=machine", f"local=l-{label}", f"remote={remote}", "type=raw",
                                        "verify=signature"), user)]
        if label == "granted":  # the transfer was started (and fails, on its own)
            assert rc == 0, err
    # The caller's allowInteractiveAuthentication goes to polkit (no agent here: still a challenge).
    rc, _replies, err = varlink(CHALLENGED[0], images, "io.systemd.MachineImage.Clone",
                                {"name": "sv1", "newName": "v2", "allowInteractiveAuthentication": True},
                                "--graceful=io.systemd.InteractiveAuthenticationRequired")
    assert rc == 0, err
    assert questions(polkitd) == [("org.freedesktop.machine1.manage-images",
                                   ("image=sv1", "new_name=v2", "verb=clone"), "bin")]
    log = daemons.log_of("machined").read_text()
    assert "'new_name': 'v2'}), for unix-process, interactive." in log
    assert "'new_name': 'v1'}), for unix-process, not interactive." in log
    # And the D-Bus flag, as busctl sets it by default and machinectl with --no-ask-password does not.
    run_as(CHALLENGED[0], ["busctl", "--system", "call", *MACHINE1, "SetPoolLimit", "t", "1000"])
    run_as(CHALLENGED[0], ["busctl", "--system", "--allow-interactive-authorization=no", "call", *MACHINE1,
                           "CleanPool", "s", "hidden"])
    log = daemons.log_of("machined").read_text()
    assert "({'verb': 'set_pool_limit'}), for system-bus-name, interactive." in log
    assert "({'verb': 'clean_pool', 'mode': 'hidden'}), for system-bus-name, not interactive." in log
    assert [q[0] for q in questions(polkitd)] == ["org.freedesktop.machine1.manage-machines"] * 2
    # Root asks nobody.
    rc, _replies, err = sid.call(images, "io.systemd.MachineImage.Clone", {"name": "sv1", "newName": "byroot"})
    assert rc == 0, err
    assert questions(polkitd) == []


# --- no polkit on the bus --------------------------------------------------------------------------------


def no_polkit_steps(pool: Pool) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []
    for label, uid in USERS:
        for verb in (["clone", "sv1", f"c-{label}"], ["set-limit", "2G"]):
            steps.append((f"{label}: {' '.join(verb)}",
                          run_as(uid, sid.argv("machinectl", "--no-pager", "--no-ask-password", *verb))))
    steps.append(("root: clone", run_as(0, sid.argv("machinectl", "clone", "sv1", "c-root"))))
    steps.append(("the pool after", sorted(os.listdir(pool.path))))
    return steps


@PLAIN
def test_without_polkit(polkitd: Polkitd, daemons: Daemons, chroot: sid.Chroot, pool: Pool, tmp_path: Path) -> None:
    polkitd.stop()
    try:
        both = sid.Both("machined", daemons, chroot, pool, tmp_path, lambda: prepare(pool), level="info")
        ours = both.ours(lambda: no_polkit_steps(pool))
        both.steps.same(ours, both.theirs(lambda: no_polkit_steps(pool)))
        answers = dict(ours)
        assert answers["granted: clone sv1 c-granted"] == "Could not clone image: Access denied\nrc=1\n"
        assert answers["root: clone"] == "rc=0\n"
        # Over Varlink, as systemd 262 refuses: PermissionDenied.
        prepare(pool)
        daemons.start("machined")
        try:
            rc, _replies, err = varlink(GRANTED[0], "/run/systemd/machine/io.systemd.MachineImage",
                                        "io.systemd.MachineImage.Clone", {"name": "sv1", "newName": "x"},
                                        "--graceful=org.varlink.service.PermissionDenied")
            assert rc == 0, err
        finally:
            daemons.stop("machined")
    finally:
        polkitd.start()


def test_questions_are_logged_as_asked(polkitd: Polkitd) -> None:
    """The harness itself: a question of pkcheck's comes back as asked."""
    questions(polkitd)
    subject = subprocess.Popen(as_user(GRANTED[0], ["sleep", "60"]))
    try:
        world.wait_for(lambda: f"\t{GRANTED[0]}\t" in Path(f"/proc/{subject.pid}/status").read_text(), 10,
                       "the subject to run as nobody")
        # (only root may pass details)
        r = subprocess.run(["pkcheck", "--action-id", "org.freedesktop.import1.pull", "--process", str(subject.pid),
                            "--detail", "remote", "http://x/y"], capture_output=True, text=True)
    finally:
        subject.kill()
        subject.wait()
    assert r.returncode == 0, r.stderr
    assert polkitd.questions() == [Question("org.freedesktop.import1.pull", ("remote=http://x/y",), "nobody")], \
        polkitd.log.read_text()[-2000:]


def test_error_names() -> None:
    """Each answer of polkit's, named by the one table (imagepool.errors) as systemd 262 names it."""
    from imagepool.authz import detail_pairs
    from imagepool.errors import InteractiveAuthorizationRequired, PermissionDenied, PolkitFailure, dbus_name
    from imagepool.varlink_service import to_error

    cases = [
        (PermissionDenied(), "org.freedesktop.DBus.Error.AccessDenied", "Permission denied",
         "org.varlink.service.PermissionDenied", {}),
        (InteractiveAuthorizationRequired(), "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
         INTERACTIVE, "io.systemd.InteractiveAuthenticationRequired", {}),
        # polkit's other errors pass on; over Varlink as their errno (sd-bus's mapping of the name)
        (PolkitFailure("org.freedesktop.DBus.Error.NoReply", "Method call timed out"),
         "org.freedesktop.DBus.Error.NoReply", "Method call timed out", "io.systemd.System",
         {"origin": "linux", "errnoName": "ETIMEDOUT", "errno": 110}),
        (PolkitFailure("org.freedesktop.DBus.Error.AccessDenied", "Rejected send message"),
         "org.freedesktop.DBus.Error.AccessDenied", "Rejected send message", "org.varlink.service.PermissionDenied",
         {}),
    ]
    for exc, name, message, varlink_error, parameters in cases:
        error = to_error(exc, "io.systemd.MachineImage")
        assert (dbus_name(exc), exc.message, error.name, error.parameters) == (name, message, varlink_error,
                                                                                parameters)
    # systemd's STRV_MAKE() details end at the first missing value.
    assert detail_pairs("remote", "u", "local", None, "class", "machine") == {"remote": "u"}
    assert detail_pairs("remote", "u", "local", "l") == {"remote": "u", "local": "l"}
