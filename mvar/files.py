"""Reading the project's files: every failure to read or parse one becomes one line naming the file.

A truncated, garbage or hand-edited file must never reach the user as a parser traceback. Each
format has one reader here (YAML, JSON, torch pickles of tensors, .npz); the modules that own a
file's layout (``mvar.checkpoint``, ``mvar.data.manifest`` ...) call them and check the content.
The sha256 helpers every layer records and checks (shards, checkpoints, Inception weights) live
here too: on the ground floor, so that no module reaches up a layer for them.
Writing: ``save_torch`` (fsynced), ``write_text_atomic`` (never half a file under the final name),
``fsync_path`` / ``fsync_tree`` (a file, a rename's directory, a tree on disk before it is published),
and ``disk_full`` / ``disk_full_error`` to tell a full disk among write errors and say so on one line.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from mvar.errors import DiskFull, UserError

# what numpy raises on a truncated, garbage or non-npz file
NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def sha256_stream(fh: IO[bytes], chunk_bytes: int = 1 << 20) -> str:
    """sha256 of what is left in a binary stream, read in chunks (shards and weights are large)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(chunk_bytes), b""):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return sha256_stream(fh)


def _text(path: Path, what: str, error: type[Exception]) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {what} '{path}': {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """A parser's message on one line (YAML's span several, with a caret drawing)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split()) or type(err).__name__


def read_yaml(path: str | Path, what: str = "YAML file", error: type[Exception] = UserError) -> Any:
    """The parsed content of a YAML file (None when empty)."""
    import yaml
    path = Path(path)
    text = _text(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{what} '{path}' is not valid YAML: {one_line(err)}") from None


def read_mapping(path: str | Path, what: str = "YAML file", error: type[Exception] = UserError) -> dict:
    """A YAML file that must hold a mapping at the top level (an empty file is an empty mapping)."""
    data = read_yaml(path, what, error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} '{path}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def parse_json(text: str | bytes, where: str, what: str = "JSON file") -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise UserError(f"{what} '{where}' is not valid JSON: {one_line(err)}") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    return parse_json(_text(path, what, UserError), str(path), what)


def read_json_mapping(path: str | Path, what: str = "JSON file") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def load_torch(path: str | Path, what: str = "weights file", mmap: bool = False) -> Any:
    """``torch.load`` of tensors and plain containers only (never unpickles code); ``mmap``: tensors
    are mapped, not read (a check of a large file's structure costs its pickle only)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated, garbage, not a torch file, pickled code ...
        raise UserError(f"cannot read {what} '{path}' (truncated or not a torch file?): {one_line(err)}") from None


def check_torch_file(path: str | Path, what: str = "weights file") -> None:
    """Refuse a truncated or garbage torch file without loading its tensors (for files another library
    loads later): a zip-format file must have an intact directory with a pickle in it; other files
    (torch's legacy format) are loaded once."""
    path = Path(path)
    if not zipfile.is_zipfile(path):  # also false for a zip cut short: its directory is at the end
        load_torch(path, what)
        return
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                raise UserError(f"{what} '{path}' is a zip file but not one written by torch.save")
    except zipfile.BadZipFile as err:
        raise UserError(f"cannot read {what} '{path}': {one_line(err)}") from None


# --------------------------------------------------------------------------- writing

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a file of ours, flushed and fsynced: a full disk surfaces as the
    OSError(ENOSPC) under torch's RuntimeError (given a path, torch reports only "file write failed")."""
    import torch
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_path(path: str | Path) -> None:
    """A file's data, or a directory's entries (what makes a rename in it durable), on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Every file and directory below ``root`` on disk (before a rename publishes them)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def disk_full(err: BaseException | None) -> bool:
    """True when ``err`` or an error it was raised from or during is ENOSPC / EDQUOT."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def disk_full_error(path: str | Path, what: str, after: str = "") -> DiskFull:
    """The one line for a full disk met while writing ``what`` under ``path`` (a directory or a file)."""
    where = Path(path) if Path(path).is_dir() else Path(path).parent
    return DiskFull(f"no space left on the device of '{where}' while writing {what} "
                    f"({human_bytes(free_bytes(where))} free){after}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` at ``path`` through a temp file beside it (`NAME.tmp-PID`, fsynced, renamed), so a reader
    never sees half of it; a full disk removes the temp file and is a DiskFull naming ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(err):
            raise disk_full_error(path, f"'{Path(path).name}'") from None
        raise
