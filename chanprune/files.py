"""Writing files atomically: a temporary file next to the target, then a rename, so a failed or
interrupted write never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ChanpruneError


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary file next to ``path`` (same suffix), then move it into place."""
    path = Path(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as err:
        raise ChanpruneError(f"cannot write {str(path)!r} ({err.strerror or err}); "
                             "choose a writable folder") from err
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        raise ChanpruneError(f"cannot write {str(path)!r} ({err.strerror or err}); "
                             "choose a writable folder with free space") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(path: str | Path, option: str = "") -> None:
    """Raise unless ``path`` could be written: not a folder, under a writable folder (missing
    folders are created on writing). ``option`` names the path in the message (``--out``). The CLI
    checks its outputs before a run, so that a bad path fails at once instead of after the work."""
    path = Path(path).absolute()
    what = f"{option} {str(path)!r}" if option else repr(str(path))
    if path.is_dir():
        raise ChanpruneError(f"{what} is a folder; give a file name")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ChanpruneError(f"cannot write {what}: {str(folder)!r} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ChanpruneError(f"cannot write {what}: folder {str(folder)!r} is not writable; choose a writable folder")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text))
