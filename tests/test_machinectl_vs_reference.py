"""Real machinectl 252 against our machined and against systemd-machined 252
on identical pools: the same output, messages and exit codes, but for what
systemd 262 says differently, which we follow (tests.newer)."""

from __future__ import annotations

import pytest

from tests import newer
from tests.conftest import Daemons, Pool, machinectl
from tests.imagetree import normalize, populate

READ_VERBS = [
    ["list-images"],
    ["list-images", "--all"],
    ["list-images", "--no-legend"],
    ["image-status", "sv1"],
    ["image-status", "dir1"],
    ["image-status", "raw1"],
    ["image-status", ".hidden1"],
    ["image-status"],
    ["show-image", "sv1"],
    ["show-image", "dir1"],
    ["show-image", "raw1"],
    ["show-image", "--all", "raw1"],
    ["show-image", "-p", "Type", "sv1"],
    ["show-image"],
    ["image-status", "nosuch"],
    ["show-image", "nosuch"],
    ["image-status", "../etc"],
    ["remove", "nosuch"],
    ["rename", "nosuch", "x"],
    ["clone", "nosuch", "x"],
    ["read-only", "nosuch"],
]

MUTATIONS = [
    ["clone", "sv1", "sv2"],
    ["clone", "sv1", "sv2"],
    ["clone", "sv1", "../x"],
    ["clone", "sv1", ".#x"],
    ["clone", "sv1", "a/b"],
    ["clone", "--read-only", "dir1", "dir2"],
    ["clone", "raw1", "raw2"],
    ["list-images"],
    ["rename", "sv2", "sv3"],
    ["rename", "sv3", "dir1"],
    ["rename", "sv3", "../y"],
    ["rename", "raw2", "raw3"],
    ["read-only", "sv3"],
    ["read-only", "raw3"],
    ["read-only", "dir1"],
    ["list-images"],
    ["show-image", "-p", "ReadOnly", "sv3"],
    ["read-only", "sv3", "false"],
    ["read-only", "raw3", "no"],
    ["read-only", "dir1", "0"],
    ["read-only", "dir2", "false"],
    ["list-images"],
    ["set-limit", "dir1", "1G"],
    ["set-limit", "raw3", "1G"],
    ["remove", "raw3", "dir2"],
    ["remove", ".host"],
    ["rename", ".host", "foo"],
    ["clean"],
    ["list-images", "--all"],
    ["clean", "--all"],
    ["list-images", "--all"],
]


def run_all(daemons: Daemons, start, verbs: list[list[str]]) -> list[str]:
    start()
    outputs = []
    for verb in verbs:
        r = machinectl(*verb)
        outputs.append(f"$ machinectl {' '.join(verb)}\n{r.stdout}{r.stderr}rc={r.returncode}\n")
    daemons.stop()
    return outputs


def assert_same(ours: list[str], reference: list[str]) -> None:
    """The same, but for what systemd 262 says differently (tests.newer)."""
    mismatches = [
        f"--- reference (as 262 would say it)\n{expected}\n--- ours\n{got}"
        for o, r in zip(ours, reference, strict=True)
        if (got := newer.machinectl_output(normalize(o), ours=True))
        != (expected := newer.machinectl_output(normalize(r), ours=False))
    ]
    assert not mismatches, "\n".join(mismatches)


def test_read_verbs_match_reference(pool: Pool, daemons: Daemons) -> None:
    populate(pool.path, pool.btrfs)
    reference = run_all(daemons, daemons.start_reference, READ_VERBS)
    ours = run_all(daemons, daemons.start_ours, READ_VERBS)
    assert_same(ours, reference)
    # The outputs are real: the images are listed with their types.
    assert "sv1" in ours[0] and ("subvolume" if pool.btrfs else "directory") in ours[0]
    assert ".hidden1" in ours[1] and ".hidden1" not in ours[0]


def test_mutations_match_reference(pool: Pool, daemons: Daemons) -> None:
    # A raw image full of data: systemd 252 fills the holes of a sparse one
    # when it clones it, which we don't copy.
    populate(pool.path, pool.btrfs, raw_data=True)
    reference = run_all(daemons, daemons.start_reference, MUTATIONS)
    reference_state = sorted(p.name for p in pool.path.iterdir())
    pool.wipe()
    populate(pool.path, pool.btrfs, raw_data=True)
    ours = run_all(daemons, daemons.start_ours, MUTATIONS)
    assert_same(ours, reference)
    assert sorted(p.name for p in pool.path.iterdir()) == reference_state


@pytest.mark.parametrize("verb", [["remove", "sv1"], ["rename", "sv1", "other"], ["read-only", "sv1"]])
def test_locked_image_matches_reference(pool: Pool, daemons: Daemons, verb: list[str]) -> None:
    """An image held by a running nspawn (its lock files) can't be changed."""
    from imagepool.locks import image_path_lock

    populate(pool.path, pool.btrfs)
    with image_path_lock(str(pool / "sv1")):
        reference = run_all(daemons, daemons.start_reference, [verb, ["list-images"]])
        ours = run_all(daemons, daemons.start_ours, [verb, ["list-images"]])
    assert_same(ours, reference)
    assert "rc=1" in ours[0]
    assert (pool / "sv1").is_dir()


def test_unprivileged_caller_matches_reference(pool: Pool, daemons: Daemons) -> None:
    """Without polkit, systemd refuses changes from non-root callers."""
    populate(pool.path, pool.btrfs)
    verbs = [["remove", "dir1"], ["rename", "dir1", "x"], ["clone", "dir1", "x"], ["read-only", "dir1"],
             ["set-limit", "dir1", "1G"], ["set-limit", "1G"], ["clean", "--all"], ["list-images"]]

    def run_as_nobody(start) -> list[str]:
        start()
        outputs = []
        for verb in verbs:
            r = machinectl(*verb, user="nobody")
            outputs.append(f"$ machinectl {' '.join(verb)}\n{r.stdout}{r.stderr}rc={r.returncode}\n")
        daemons.stop()
        return outputs

    reference = run_as_nobody(daemons.start_reference)
    ours = run_as_nobody(daemons.start_ours)
    assert_same(ours, reference)
    assert all("rc=1" in out for out in ours[:-1])
    assert (pool / "dir1").is_dir()
