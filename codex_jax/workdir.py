"""One writer per workdir: an exclusive lock that the kernel releases when its process dies.

`codex train` and `codex import hf` hold WORKDIR/writer.lock (fcntl.flock) while they write; a second writer is
refused at once, naming the holder's pid and host. Readers (`lineage verify`, `eval`, `export`, `generate`) take no
lock. flock is advisory and local to one kernel: on a network filesystem whose flock does not reach other hosts,
two hosts could still both write (the multi-host run itself locks on process 0 only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
from collections.abc import Iterator

LOCK_FILE = "writer.lock"


class WorkdirInUse(RuntimeError):
  """Another process holds the workdir's writer lock."""


@contextlib.contextmanager
def writer_lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/writer.lock for the block. A workdir this call had to create, and that holds nothing but the
  lock when the block fails, is removed again: a refused run leaves nothing behind."""
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirInUse(f"--workdir={workdir} is in use by {holder} ({path}); one writer per workdir: wait for it, "
                         "stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    try:
      yield
    except BaseException:
      if created and os.listdir(workdir) == [LOCK_FILE]:
        shutil.rmtree(workdir, ignore_errors=True)
      raise
  finally:
    os.close(fd)  # Closing the descriptor releases the lock (as the kernel does when the process dies).
