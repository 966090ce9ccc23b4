"""Where shards live: local paths, `pipe:` commands, and fsspec URLs (s3://, gs://, ...).

One opener for every reader in the package, so the loader, `verify` and
`tokenize` accept the same locations. Local paths and `file://` open directly;
`pipe:` and http(s) go through WebDataset's gopen (curl, shell pipes);
any other scheme goes through fsspec, which needs the matching backend
installed (s3fs for s3://, gcsfs for gs://); it is not a hard dependency.
"""
from __future__ import annotations

import os
from typing import IO
from urllib.parse import urlparse

from mvar.errors import UserError
from mvar.files import sha256_stream

# schemes WebDataset's gopen handles better than fsspec (shell pipes, curl streaming)
_GOPEN_SCHEMES = ("pipe", "http", "https")


def scheme(location: str) -> str:
    """'' for plain paths; Windows drive letters are not a concern on the cluster."""
    if location.startswith("pipe:"):
        return "pipe"
    return urlparse(location).scheme


def is_local(location: str) -> bool:
    return scheme(location) in ("", "file")


def local_path(location: str) -> str:
    return urlparse(location).path if location.startswith("file:") else location


def join(location: str, name: str) -> str:
    """`join('s3://b/in256', 'manifest.json') -> 's3://b/in256/manifest.json'`."""
    if is_local(location):
        return os.path.join(local_path(location), name)
    return location.rstrip("/") + "/" + name


def open_read(url: str) -> IO[bytes]:
    """A binary stream for `url`; the caller closes it."""
    kind = scheme(url)
    if kind in ("", "file"):
        return open(local_path(url), "rb")
    if kind in _GOPEN_SCHEMES:
        import webdataset as wds
        return wds.gopen(url, "rb")
    return _fsspec_open(url)


def _fsspec_open(url: str) -> IO[bytes]:
    import fsspec
    try:
        return fsspec.open(url, "rb").open()
    except ImportError as err:  # backend missing, e.g. s3fs for s3://
        raise UserError(f"cannot open {url}: {err} (install the fsspec backend for "
                        f"'{scheme(url)}://', e.g. `pip install s3fs`)") from err


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    if scheme(url) in _GOPEN_SCHEMES:
        return True  # cannot ask a pipe; the open will tell
    import fsspec
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    with open_read(url) as fh:
        return fh.read()


def sha256_url(url: str) -> str:
    with open_read(url) as fh:
        return sha256_stream(fh)


def apply_opener(url: str, template: str) -> str:
    """`template` like 'pipe:aws s3 cp {url} -' wraps a shard URL; '' leaves it."""
    return template.format(url=url) if template else url
