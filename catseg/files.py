"""Files written whole or not at all: a temporary name unique to the process beside the target, then a rename."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary name (host and process in it, so concurrent writers never share
    one), synced and renamed into place; on any error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON through `write_bytes_atomic`."""
    return write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())
