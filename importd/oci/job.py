"""pull-oci: one OCI image from a registry (or a local layout or archive)
into the pool, as systemd 262's ``systemd-pull oci`` does, but:

- the layers download in parallel, at most ``parallel`` at once, each
  resumed with Range requests when its connection drops (importd.http);
- the layers are the pool's ``.oci-sha256:HEX`` store, shared by digest
  between images and between concurrent pulls (importd.oci.store): a layer
  that is there, or that another pull is downloading, is not downloaded
  again;
- every blob is checked against its digest as it streams and every layer's
  content against the configuration's diff_id before it is used; whiteouts
  and opaque directories become overlayfs ones;
- nothing is left behind on failure or cancel: temporaries are removed, and
  so are the layers this pull added (unless another pull has started using
  them); the image appears under its name only when complete;
- progress counts the bytes of all layers.

The flow: resolve the manifest (an index picks linux on this machine's
architecture), fetch the configuration, lock the layers (in digest order),
unpack the missing ones in worker threads, install them bottom first (a
layer's unlisted directories take their attributes from the layers below,
importd.oci.whiteouts), then write the image (importd.oci.install).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from dataclasses import dataclass, field

from imagepool import tree
from imagepool.image import Pool
from imagepool.locks import image_name_lock
from importd.context import Canceled, JobContext, TransferError, exiting_on_failure
from importd.http import HttpOptions
from importd.local import DEFAULT_MAX_IMAGE_SIZE
from importd.oci import install, layer, whiteouts
from importd.oci import manifest as mf
from importd.oci.local import LocalSource
from importd.oci.reference import Reference, default_local_name, parse
from importd.oci.registry import RegistrySource
from importd.oci.store import LayerLock, LayerStore
from importd.progress import format_bytes

# Layers at once: one per CPU, between 2 and 4.  Each layer keeps a download,
# a decoding thread and a tar busy; more of them than CPUs only contend
# (pull-oci of 286 MB in 5 layers on 2 CPUs: 4 at once 1.6-1.9 s of CPU,
# 2 at once 1.3-1.4 s, and no slower).
DEFAULT_PARALLEL = max(2, min(4, os.cpu_count() or 1))


@dataclass
class OciPullRequest:
    ref: str
    local: str = ""
    force: bool = False
    read_only: bool = False
    flatten: bool = False
    parallel: int = DEFAULT_PARALLEL
    max_size: int = DEFAULT_MAX_IMAGE_SIZE
    http: HttpOptions | None = None
    sync: bool = True
    env: dict[str, str] | None = field(default=None, repr=False)  # for credentials (tests)


Source = RegistrySource | LocalSource


def pull_oci(ctx: JobContext, req: OciPullRequest, pool: Pool) -> None:
    with exiting_on_failure(ctx):
        ref = parse(req.ref)
        name = req.local or default_local_name(ref)
        ctx.log(f"Pulling '{req.ref}', saving as '{name}'.")
        if not req.force and pool.exists(name):
            raise TransferError(f"Image '{name}' already exists.")
        source: Source = LocalSource(ctx, ref) if ref.local else RegistrySource(ctx, ref, req.http, req.env)
        try:
            with image_name_lock(name):
                _pull(ctx, req, pool, ref, name, source)
        finally:
            source.close()
    ctx.progress(1.0)
    ctx.log("Operation completed successfully.")
    ctx.log("Exiting.")


def _resolve(ctx: JobContext, source: Source, ref: Reference) -> mf.Manifest:
    data, kind = source.manifest()
    if kind in mf.INDEXES:
        chosen = mf.pick(mf.parse_index(data, kind))
        ctx.log(f"Picked manifest {chosen.digest} for {chosen.platform.get('os', 'linux')}/"
                f"{chosen.platform.get('architecture', '?')}.")
        data, kind = source.manifest(chosen.digest)
        if kind in mf.INDEXES:
            raise TransferError("Already processed an OCI index, refusing to process another one.")
    return mf.parse_manifest(data, kind)


class _Progress:
    """The bytes of all layers being downloaded, as one fraction."""

    def __init__(self, ctx: JobContext, sizes: dict[str, int], start: float, end: float) -> None:
        self.ctx = ctx
        self.total = max(sum(sizes.values()), 1)
        self.sizes = sizes
        self.done: dict[str, float] = dict.fromkeys(sizes, 0.0)
        self.lock = threading.Lock()
        self.start, self.end = start, end

    def of(self, digest: str):  # type: ignore[no-untyped-def]
        def update(fraction: float) -> None:
            with self.lock:
                self.done[digest] = fraction * self.sizes[digest]
                total = sum(self.done.values())
            self.ctx.progress(self.start + (self.end - self.start) * total / self.total)
        return update


def _pull(ctx: JobContext, req: OciPullRequest, pool: Pool, ref: Reference, name: str, source: Source) -> None:
    m = _resolve(ctx, source, ref)
    config = mf.parse_config(source.blob(m.config, mf.CONFIG_MAX), len(m.layers))
    ctx.progress(0.02)
    store = LayerStore(pool)
    digests = [d.digest for d in m.layers]
    unique = {d.digest: d for d in m.layers}
    diff_ids = dict(zip(digests, config.diff_ids, strict=False)) if config.diff_ids else {}
    locks: dict[str, LayerLock] = {}
    added: list[str] = []  # layers this pull installed
    temps: dict[str, str] = {}
    try:
        for digest in sorted(unique):  # digest order: no deadlock between pulls
            locks[digest] = store.acquire(ctx, digest)
        missing: list[str] = []
        for d in digests:
            if locks[d].exclusive and d not in missing:
                missing.append(d)
        ctx.log(f"Image {source.describe()} has {len(digests)} layers, {len(digests) - len(missing)} "
                "already present.")
        for d in digests:
            if d not in missing:
                ctx.log(f"Layer '{store.path(d)}' already exists, skipping download.")
        if missing:
            total = sum(unique[d].size for d in missing)
            ctx.log(f"Downloading {format_bytes(total)} in {len(missing)} layers, {req.parallel} at a time.")
        implicit = _download(ctx, req, pool, source, [unique[d] for d in missing], diff_ids, temps)
        ctx.progress(0.95)
        for k, digest in enumerate(digests):
            if digest in implicit and digest in temps:
                whiteouts.fix_implicit(temps[digest], implicit[digest], [store.path(d) for d in digests[:k]])
                store.install(temps.pop(digest), digest, req.sync)
                added.append(digest)
        paths = [store.path(d) for d in digests]
        install.make_local(ctx, pool, name, digests, paths, config, force=req.force, read_only=req.read_only,
                           flat=req.flatten, sync=req.sync)
        added.clear()
        ctx.log("Everything done.")
    finally:
        for tmp in temps.values():
            if tmp:
                layer.remove_quietly(tmp)
        for digest in added:
            layer.remove_quietly(store.path(digest))  # still exclusively ours: nobody uses it
        for lock in locks.values():
            lock.release()


def _download(ctx: JobContext, req: OciPullRequest, pool: Pool, source: Source, todo: list[mf.Descriptor],
              diff_ids: dict[str, str], temps: dict[str, str]) -> dict[str, list[str]]:
    """Unpack TODO in parallel into temporaries (recorded in TEMPS at once,
    so the caller removes them whatever happens); the implicit directories
    of each."""
    if not todo:
        return {}
    progress = _Progress(ctx, {d.digest: d.size for d in todo}, 0.02, 0.95)
    for d in todo:
        temps[d.digest] = tree.temp_name(pool.path, f".oci-{d.digest}")
    # The workers' own cancellation: the first failure stops the others.
    sub = JobContext(threading.Event(), ctx.log, ctx.progress, [])
    ctx.cancel_hooks.append(sub.request_cancel)
    if ctx.cancel.is_set():
        sub.request_cancel()
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, req.parallel),
                                                   thread_name_prefix="oci-layer") as pool_:
            futures = {pool_.submit(layer.unpack, sub, source, d, diff_ids.get(d.digest), temps[d.digest],
                                    progress.of(d.digest), req.max_size): d for d in todo}
            for future in concurrent.futures.as_completed(futures):
                d = futures[future]
                try:
                    results[d.digest] = future.result()
                    ctx.log(f"Layer {d.digest} unpacked.")
                except BaseException as e:
                    errors.append(e)
                    sub.request_cancel()
    finally:
        ctx.cancel_hooks.remove(sub.request_cancel)
    ctx.check()
    if errors:  # the first real failure, not the cancels it caused
        raise next((e for e in errors if not isinstance(e, Canceled)), errors[0])
    for d in todo:
        if not os.path.isdir(temps[d.digest]):
            raise TransferError(f"Layer {d.digest} vanished while unpacking.")
    return results
