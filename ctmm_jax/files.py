"""Whole files on disk: atomic replacement of outputs, content fingerprints, and the errors that
reading a damaged .npz archive raises.

An output is written to a temporary file beside it and moved over it in one step (`os.replace`
is atomic within a folder), so a reader sees the old file or the whole new one, never a part:
a run that is interrupted, killed, or stopped by a full disk or a file-size limit leaves what
was there before. No JAX here (the command line imports this before any JAX).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# what reading a truncated or damaged .npz/.npy raises: not a zip archive (BadZipFile), a member
# that fails its CRC or decompression (BadZipFile, zlib.error), a file that ends early
# (EOFError), a header or array that does not parse or needs pickle (ValueError), a missing
# member (KeyError), a read error (OSError)
NPZ_ERRORS = (ValueError, EOFError, KeyError, OSError, zipfile.BadZipFile, zlib.error)


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths to write `paths` to; when the block ends without an error they replace
    `paths`, in the order given (put a sidecar that describes the others last), else they are
    removed, whatever the error (KeyboardInterrupt too), and `paths` stay as they were.

    A temporary path is in its target's folder (so the replacement is atomic) and ends with its
    target's name (so writers that go by the extension, e.g. compression from `.gz`, do the
    same); it is hidden (`.tmp-<pid>-<random>-<name>`). A process killed outright (SIGKILL, a
    file-size limit) leaves its temporary file behind, never a partial output.
    """
    targets = [Path(p) for p in paths]
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temporary = [t.with_name(f".tmp-{token}-{t.name}") for t in targets]
    try:
        yield temporary
        for tmp, target in zip(temporary, targets, strict=True):
            os.replace(tmp, target)
    except BaseException:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (a dataset may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(value) -> str:
    """Hex sha256 of a JSON value in canonical form (sorted keys, no spaces): equal for values
    that are equal after a JSON round trip, e.g. settings written to a sidecar and read back."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
