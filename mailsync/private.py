"""Reading a file only its owner may see: the key file, the restore witness.

Both are found by name beside the config, and both decide what mailsync
trusts: a link there would point mailsync at a file somebody else chose,
and following it leaves a moment between check and read in which the link
can be turned. So the file is opened with ``O_NOFOLLOW`` and checked on the
open descriptor — a regular file, owned by the user running mailsync, with
no permission for group or others — and what is checked is what is read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mailsync.errors import ConfigError


def read_private(path: Path, what: str) -> bytes | None:
    """The content of ``path`` (``what`` names it in errors: "key file"), or
    None when there is no such file; ConfigError for a link, another
    owner's file or one others may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if path.is_symlink():
            raise ConfigError(
                f"{what} {path} is a symbolic link; mailsync refuses to follow it",
                hint=f"put the file itself at {path} (mv its target there)",
            ) from None
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"{what} {path} is owned by uid {st.st_uid}, not by the user running "
                f"mailsync (uid {os.geteuid()}); mailsync refuses to use it",
                hint=f"run mailsync as the {what}'s owner, or chown {os.geteuid()} {path}",
            )
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{what} {path} can be read by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                "mailsync refuses to use it",
                hint=f"chmod 600 {path}",
            )
        try:
            return fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
