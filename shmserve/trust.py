"""What the server checks before it trusts a file it did not just create (spec section 6.1):
that it is ours, not a symlink, of the right type, and in directories no one else can change.

/dev/shm and /tmp are writable by every user: any of them can create a name first, or
plant a symlink there, and a server that opened such a file as its own would take orders
from that user (a lock file held by them) or change a file of theirs (chmod through a link).
"""
from __future__ import annotations

import os
import stat


class UntrustedFileError(PermissionError):
    """A file or directory the server would use belongs to someone else or is not what it
    should be; nothing was changed."""


def check_own(info: os.stat_result, path: str, kind: str, is_kind) -> None:
    """Refuses ``path`` (as ``os.lstat``/``os.fstat`` saw it) unless it is a ``kind`` that
    this process's user owns."""
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedFileError(f"{path} is a symlink, not a {kind}")
    if not is_kind(info.st_mode):
        raise UntrustedFileError(f"{path} is not a {kind}")
    if info.st_uid != os.geteuid():
        raise UntrustedFileError(f"{path} is owned by uid {info.st_uid}, not by this server's "
                                 f"uid {os.geteuid()}")


def check_directories(real_dir: str) -> None:
    """Every directory from ``real_dir`` (already resolved, so free of symlinks) up to / must
    be owned by root or by us, and writable by others only when sticky (as /tmp is): whoever
    can rename entries in one of them could swap a socket for their own."""
    me = os.geteuid()
    path = real_dir
    while True:
        info = os.lstat(path)
        if info.st_uid not in (0, me):
            raise UntrustedFileError(f"{path} is owned by uid {info.st_uid}: that user could "
                                     f"replace what this server puts under it")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise UntrustedFileError(f"{path} is writable by others (mode "
                                     f"{stat.S_IMODE(info.st_mode):o}) and not sticky")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def private_directory(path: str, group_access: bool) -> None:
    """Creates ``path`` 0700 (0710 with group access: the group may reach a socket inside
    but not list or change the directory), or checks that the existing one is ours."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    check_own(info, path, "directory", stat.S_ISDIR)
    mode = stat.S_IMODE(info.st_mode)
    # Never take g+x away: another server of ours may serve its group from here.
    wanted = 0o700 | (0o010 if group_access or mode & 0o010 else 0)
    if mode != wanted:
        os.chmod(path, wanted)  # lstat said ours and no link, and no one else may rename it
