"""The topic index over POSIX shared memory (posix_ipc + mmap), and stale-segment cleanup.

Names: the root is ``/shoal-<tag>-index``, data segments ``/shoal-<tag>-index.<epoch>``.
The router creates and unlinks them (it is the only writer); shards attach by tag. A
segment outlives every process until unlinked (FACTS.md), so a router that crashed leaves
its segments behind: ``cleanup_stale`` removes them, and ``ShmTopicIndex.create`` does so
for its own names, after retiring them so shards still mapped to them move on.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Callable

from typing import TYPE_CHECKING

import posix_ipc

from .index import (
    DATA_MAGIC, DEFAULT_MAX_SHAPES, H_GEN, H_MAGIC, H_OWNER, H_OWNER_START, H_RETIRED, HDR_WORDS,
    R_MAGIC, R_OWNER, R_OWNER_START, ROOT_BYTES, ROOT_MAGIC, TopicIndex, process_start,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["SHM_DIR", "ShmSegments", "ShmTopicIndex", "base_name", "cleanup_stale"]

SHM_DIR = "/dev/shm"
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def base_name(tag: str) -> str:
    """``/shoal-<tag>-index``; a tag may already carry the ``/shoal-`` prefix."""
    if tag.startswith("/shoal-"):
        tag = tag[len("/shoal-"):]
    if not _TAG.fullmatch(tag):
        raise ValueError(f"host tag must match {_TAG.pattern}: {tag!r}")
    return f"/shoal-{tag}-index"


def _map(shm: posix_ipc.SharedMemory) -> mmap.mmap:
    try:
        return mmap.mmap(shm.fd, shm.size)
    finally:
        shm.close_fd()


class ShmSegments:
    """``Segments`` over POSIX shm: each buffer is an mmap of a named segment."""

    def __init__(self, base: str) -> None:
        self.base = base

    def create_root(self) -> mmap.mmap:
        return _map(posix_ipc.SharedMemory(self.base, posix_ipc.O_CREX, mode=0o600, size=ROOT_BYTES))

    def open_root(self) -> mmap.mmap | None:
        return self.open(self.base)

    def unlink_root(self) -> None:
        self.unlink(self.base)

    def create(self, epoch: int, nbytes: int) -> tuple[str, mmap.mmap]:
        name = f"{self.base}.{epoch}"
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=nbytes)
        except posix_ipc.ExistentialError:
            # Left by an earlier writer of this name that nobody cleaned: ours now.
            _retire_and_unlink(name)
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=nbytes)
        return name, _map(shm)

    def open(self, name: str) -> mmap.mmap | None:
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            return None
        if shm.size < 8 * HDR_WORDS and shm.size != ROOT_BYTES:
            shm.close_fd()
            return None  # created but not sized yet, or not ours
        return _map(shm)

    def close(self, buf: Buffer) -> None:
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes with it

    def unlink(self, name: str) -> None:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


class ShmTopicIndex(TopicIndex):
    """The topic index in POSIX shm: ``create`` in the router, ``attach`` in shards."""

    @classmethod
    def create(cls, name: str, capacity: int = 1 << 16, *,
               max_shapes: int = DEFAULT_MAX_SHAPES) -> ShmTopicIndex:
        """Create the index for host tag ``name`` (sized for ``capacity`` filters before its
        first growth). Segments of a dead earlier writer under this name are cleaned first;
        a live one makes this raise FileExistsError."""
        base = base_name(name)
        live = _live_owner(base)
        if live:
            raise FileExistsError(f"{base} is owned by running process {live}")
        _cleanup(lambda entry: entry == base[1:] or entry.startswith(base[1:] + "."))
        return cls(ShmSegments(base), capacity=capacity, max_shapes=max_shapes)

    @classmethod
    def attach(cls, name: str) -> ShmTopicIndex:
        """Attach a reader to the index of host tag ``name`` (FileNotFoundError if none)."""
        return cls(ShmSegments(base_name(name)), writer=False)


def _alive(owner: tuple[int, int]) -> bool:
    """Whether the writer (pid, start time) recorded in a segment still runs."""
    pid, start = owner
    if pid <= 0 or pid > 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    return not (start and now and now != start)  # same pid, other process: dead


def _header(entry: str) -> list[int]:
    """The first header words of /dev/shm/<entry> (fewer if it is shorter)."""
    try:
        with open(os.path.join(SHM_DIR, entry), "rb") as f:
            raw = f.read(8 * HDR_WORDS)
    except OSError:
        return []
    raw = raw[:len(raw) // 8 * 8]
    return list(memoryview(raw).cast("Q"))


def _owner(entry: str) -> tuple[int, int]:
    """The writer (pid, start time) recorded in one of our segments, (0, 0) if not ours."""
    h = _header(entry)
    if len(h) > H_OWNER_START and h[H_MAGIC] == DATA_MAGIC:
        return h[H_OWNER], h[H_OWNER_START]
    if len(h) > R_OWNER_START and h[R_MAGIC] == ROOT_MAGIC:
        return h[R_OWNER], h[R_OWNER_START]
    return 0, 0


def _live_owner(base: str) -> int:
    owner = _owner(base[1:])
    return owner[0] if owner[0] != os.getpid() and _alive(owner) else 0


def _retire_and_unlink(name: str) -> None:
    """Unlink ``name``; if it is one of our data segments, retire it first so readers still
    mapped to it re-attach (to the new index, or answer FULL_MASK meanwhile)."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        return
    try:
        if shm.size >= 8 * HDR_WORDS:
            m = _map(shm)
            mv = memoryview(m).cast("Q")
            if mv[H_MAGIC] == DATA_MAGIC:
                mv[H_RETIRED] = 1
                mv[H_GEN] = mv[H_GEN] | 1
            mv.release()
            m.close()
        else:
            shm.close_fd()
    finally:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def _cleanup(select: Callable[[str], bool]) -> list[str]:
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except OSError:
        return []  # no /dev/shm (not Linux): nothing we can list
    removed: list[str] = []
    for entry in entries:
        if not select(entry):
            continue
        owner = _owner(entry)
        if owner[0] and (owner[0] == os.getpid() or _alive(owner)):
            continue  # a running writer's segment (ours or a parallel broker's)
        _retire_and_unlink("/" + entry)
        removed.append("/" + entry)
    return removed


def cleanup_stale(prefix: str = "shoal") -> list[str]:
    """Unlink shm segments whose name starts with ``prefix`` and that no live writer owns.

    Our own segments record their writer's pid and are kept while it runs; segments in
    another format under the prefix cannot say who owns them and are removed, so call this
    once at router start, before creating anything, with the host's own prefix
    (``shoal-<tag>``). Returns the names removed.
    """
    p = prefix.lstrip("/")
    return _cleanup(lambda entry: entry.startswith(p))
