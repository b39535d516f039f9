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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as err:
        raise ChanpruneError(f"cannot write {str(path)!r} ({err.strerror or err}); "
                             "choose a writable directory") from None
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        raise ChanpruneError(f"cannot write {str(path)!r} ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomically(path, lambda tmp: tmp.write_text(text))
