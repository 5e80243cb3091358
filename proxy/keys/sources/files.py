"""A key in a file: a Kubernetes Secret volume, a Docker secret, a file Vault Agent renders.

The file is re-read when it changes, found by polling its status every `poll_seconds`
(one stat call) rather than by inotify. Kubernetes updates a Secret volume by writing a
new hidden directory and swapping the `..data` symlink to it; an inotify watch on the
file itself never fires for that, a watch on its directory does, but only where inotify
works at all (not on NFS and some overlay or FUSE mounts) and within the host's watch
limits. A stat that follows symlinks sees every kind of change, everywhere: the swap
(the resolved file's inode changes), an atomic rename (same), and an in-place write (its
size, modification or change time). It costs one system call a second, and no thread or
dependency. Two writes of the same size to the same inode within one tick of the file
clock (a few ms) look alike to a stat, so a full re-read every `refresh_seconds` catches
whatever the status missed.

The file must be readable by its owner only unless the config says otherwise, and
writable by nobody else: a key file others can read leaks the key, one others can write
lets them swap in a key of their own and receive every post the apps make.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from datetime import UTC, datetime

from proxy.config.settings import FileCredentialSettings
from proxy.keys.sources.base import SecretRead, SourceError, SourceKind, key_problem
from proxy.masking.secrets import SecretRegistry

MAX_KEY_FILE_BYTES = 64 * 1024

_Signature = tuple[int, int, int, int, int] | None  # dev, inode, size, mtime_ns, ctime_ns


def _signature(status: os.stat_result) -> _Signature:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


def _change(status: os.stat_result, raw: bytes) -> str:
    """A file's content as logs may name it: when it was written, and a digest prefix
    (six bytes of SHA-256 tell contents apart and reveal nothing of a key)."""
    when = datetime.fromtimestamp(status.st_mtime, UTC).isoformat(timespec="seconds")
    return f"modified {when}, sha256 {hashlib.sha256(raw).hexdigest()[:12]}"


def permission_problem(mode: int, readable_by: str) -> str | None:
    """Why a key file's mode is unsafe for `readable_by` (owner, group, anyone), or None."""
    if mode & stat.S_IWOTH:
        return "writable by every user (anyone could put their own key in it)"
    if readable_by == "owner" and mode & (stat.S_IRGRP | stat.S_IROTH):
        who = "every user" if mode & stat.S_IROTH else "its group"
        return f"readable by {who}"
    if readable_by == "group" and mode & stat.S_IROTH:
        return "readable by every user"
    return None


class FileKeySource:
    """Reads one credential's key from a file; counts the distinct contents it has seen."""

    kind: SourceKind = "file"
    calls_per_read = 1

    def __init__(self, settings: FileCredentialSettings, secrets: SecretRegistry) -> None:
        self._settings = settings
        self._secrets = secrets
        self._path = settings.path.expanduser()
        self.where = str(self._path)
        self.poll_seconds: float | None = settings.poll_seconds
        self._lock = threading.Lock()
        self._seen: _Signature = None  # the status at the last read, good or not
        self._value: str | None = None
        self._version = 0

    def __repr__(self) -> str:
        return f"FileKeySource({self.where})"

    def changed(self) -> bool:
        """True when the file's status differs from the last read's (or it came or went)."""
        try:
            current = _signature(os.stat(self._path))
        except OSError:
            current = None
        return current != self._seen

    def read(self) -> SecretRead:
        """Read and check the key; trailing line ends are stripped, nothing else."""
        with self._lock:
            try:
                return self._read_locked()
            except SourceError:
                try:
                    self._seen = _signature(os.stat(self._path))
                except OSError:
                    self._seen = None
                raise

    def _read_locked(self) -> SecretRead:
        path = self._path
        try:
            # O_NONBLOCK: a FIFO put at the path must not hang the reading thread forever.
            fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise SourceError(f"the key file {path} does not exist", kind="not_found") from None
        except OSError as exc:
            raise SourceError(
                f"the key file {path} cannot be opened ({exc.strerror})", kind="denied"
            ) from None
        try:
            status = os.fstat(fd)  # the file that is read, whatever the path points to now
            if not stat.S_ISREG(status.st_mode):
                raise SourceError(f"the key file {path} is not a regular file", kind="invalid")
            problem = permission_problem(status.st_mode, self._settings.readable_by)
            if problem is not None:
                raise SourceError(self._unsafe(problem, status.st_mode), kind="invalid")
            raw = os.read(fd, MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise SourceError(
                f"the key file {path} cannot be read ({exc.strerror})", kind="denied"
            ) from None
        finally:
            os.close(fd)
        self._seen = _signature(status)
        change = _change(status, raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(
                f"the key file {path} ({change}) is not UTF-8 text", kind="invalid", version=change
            ) from None
        self._secrets.add(text)
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise SourceError(
                f"the key file {path} ({change}) is larger than 64 KiB",
                kind="invalid",
                version=change,
            )
        value = text.rstrip("\r\n")
        self._secrets.add(value)
        problem = key_problem(value)
        if problem is not None:
            raise SourceError(
                f"the key file {path} ({change}) does not hold an API key ({problem})",
                kind="invalid",
                version=change,
            )
        if value != self._value:
            self._value = value
            self._version += 1
        created = datetime.fromtimestamp(status.st_mtime, UTC)
        return SecretRead(value=value, version=self._version, created_time=created)

    def _unsafe(self, problem: str, mode: int) -> str:
        permissions = f"{stat.S_IMODE(mode):04o}"
        return (
            f"the key file {self._path} is {problem} (mode {permissions}); make it readable by"
            " its owner only (chmod 600; in Kubernetes, defaultMode: 0400 on the secret volume),"
            " or set readable_by: group (0440 with fsGroup) or readable_by: anyone on the"
            " credential if that is intended"
        )

    def close(self) -> None:
        """Nothing stays open between reads."""
