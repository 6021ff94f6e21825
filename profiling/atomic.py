"""Files written whole or not at all: a temp file in the same folder, renamed into place.

A reader (another visitor's page, the report CLI) never sees half a run or half a report, and a
process killed mid-write leaves only a hidden temp file, which `write_atomically` removes on error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomically(path, data: str | bytes | None = None, *, copy_from=None, mode: int = 0o644) -> Path:
    """Write `data` (text as UTF-8), or copy the file `copy_from`, to `path` atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if copy_from is not None:
                with open(copy_from, "rb") as src:
                    shutil.copyfileobj(src, out)
            else:
                out.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)  # mkstemp's file is private; run files and reports are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
