"""Locations: a local path, a shared mount or an object-store URI (s3://, gs://, anything pyarrow's filesystems
take), read and written the same way.

Prepared datasets (gan_ray.core.prepared) and run directories (gan_ray.core.run_dir) both live at a location;
this module is the one place that turns a location into a pyarrow filesystem, reads, writes and lists it, and
words its failures. Credentials come from the usual chains (environment, config files, IRSA / Workload Identity),
never from flags: pyarrow's filesystems read them. Object stores have no append and no rename, so a whole object is
written at once (a PUT is atomic); locally a temporary file is renamed, so nobody ever reads half a file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gan_ray.core.errors import UserError, one_line


def is_remote(location: str | Path) -> bool:
    """A URI (object storage, or any filesystem pyarrow reaches by URI) rather than a local or mounted path."""
    return "://" in str(location)


def filesystem(location: str | Path):
    """(pyarrow FileSystem, path inside it) for a local path or any URI pyarrow's filesystems take (s3://,
    gs://, hdfs://, file://). A cloud filesystem is built from the environment's credential chain."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"cannot open {location}: {one_line(str(exc))}") from None
    return fs, path.rstrip("/")


def uri(location: str | Path, *parts: str) -> str:
    """`location` joined with `parts` (a URI stays a URI, a local path becomes absolute)."""
    location = str(location)
    if is_remote(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location).expanduser().resolve().joinpath(*parts))


def join(location: str | Path, *parts: str) -> str | Path:
    """`location` joined with `parts`, of the kind it came as: a Path for a Path (what local callers and the tests
    compare), a string for a URI."""
    if isinstance(location, Path):
        return location.joinpath(*parts)
    return uri(location, *parts)


def storage_error(location: str | Path, exc: BaseException, doing: str) -> UserError:
    """One line for a filesystem failure: a bucket that does not exist, access denied, an unreachable endpoint."""
    text = one_line(str(exc))
    low = text.lower()
    squashed = low.replace("_", "").replace(" ", "")  # AccessDenied, ACCESS_DENIED (pyarrow), access denied
    if "accessdenied" in squashed or "forbidden" in low or "403" in low or "invalidaccesskeyid" in squashed:
        why = "access denied (check the credentials in the environment: AWS_* / GOOGLE_APPLICATION_CREDENTIALS, " \
              "a profile, IRSA or Workload Identity)"
    elif "nosuchbucket" in low or "bucket does not exist" in low or "no such bucket" in low:
        why = "no such bucket"
    elif "curl" in low or "connect" in low or "resolve" in low or "timed out" in low or "network" in low:
        why = f"unreachable ({text[:160]})"
    else:
        why = text[:200]
    return UserError(f"cannot {doing} {location}: {why}")


def check_bucket(location: str | Path, doing: str) -> None:
    """For a URI, its bucket must exist and answer: a write into a missing one fails only later, inside Ray."""
    if not is_remote(location):
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError as exc:
        raise storage_error(location, exc, doing) from None
    if missing:
        raise UserError(f"cannot {doing} {location}: no such bucket {bucket!r}")


def read_bytes(location: str | Path) -> bytes | None:
    """The whole file or object; None when there is none."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_bytes(location: str | Path, data: bytes) -> None:
    """A whole file or object at once: on object storage a PUT is atomic; locally, a temporary file renamed (its
    directory created)."""
    fs, path = filesystem(location)
    if not is_remote(location):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def append_bytes(location: str | Path, data: bytes) -> None:
    """Add to the end of a file; an object is rewritten whole with the addition (object stores cannot append), which
    suits the small, one-writer files this is for (a run's metrics.jsonl)."""
    if not is_remote(location):
        fs, path = filesystem(location)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)
        return
    write_bytes(location, (read_bytes(location) or b"") + data)


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | Path) -> bool:
    """A directory, or on object storage a key prefix with objects under it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(location: str | Path) -> list[str]:
    """Names of the entries directly under a directory (or key prefix); [] when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]


def upload_dir(local: str | Path, location: str | Path) -> None:
    """Copy a local directory's files to a location (each file whole; files already there are replaced)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


@contextmanager
def local_copy(location: str | Path) -> Iterator[Path]:
    """A local directory holding what is at `location`: the directory itself when it is local, else a temporary
    download of it (removed afterwards)."""
    if not is_remote(location):
        yield Path(location).expanduser()
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    tmp = tempfile.mkdtemp(prefix="gan-ray-download-")
    try:
        try:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        except OSError as exc:
            raise storage_error(location, exc, "download") from None
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
