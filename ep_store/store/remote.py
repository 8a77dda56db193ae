"""Bundles in object stores (issue 21, item 2): ``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` and
``file://`` URIs, through Arrow's filesystem layer (``pyarrow.fs``, the same family of stores
Lance reads). A bundle is always written and checked as a local folder; this module only
copies that folder to a URI (``upload``) or from one (``download``). Credentials come from
the environment as each store's SDK reads them (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, ...).

    upload(Path("bundles/gemma-L6"), "s3://bucket/ep/gemma-L6")
    download("s3://bucket/ep/gemma-L6", Path("pulled/gemma-L6"))
"""

from __future__ import annotations

from pathlib import Path

from ep_store.errors import EnvError, UsageError

SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "file://")
"""URI schemes ``ep publish --to`` and ``ep pull`` take besides folders and hf://."""


def is_object_uri(uri: str) -> bool:
    return uri.startswith(SCHEMES)


def _filesystem(uri: str):
    """(filesystem, path in it) of ``uri``; UsageError for one Arrow cannot open."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as err:
        raise UsageError(f"{uri}: cannot open this object-store location ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


def upload(local: Path, uri: str) -> None:
    """Copy the folder ``local`` to ``uri``, which must not exist yet (UsageError; EnvError when
    the store refuses or fails: network, credentials)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        raise UsageError(f"{uri} already exists; publish to a new location")
    try:
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except (pa.ArrowException, OSError) as err:
        raise EnvError(f"upload to {uri} failed: {err.__class__.__name__}: {str(err).splitlines()[0]}") from None


def download(uri: str, local: Path) -> Path:
    """Copy the bundle at ``uri`` into the new folder ``local``; returns it. UsageError when
    nothing is there; EnvError when the store fails."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UsageError(f"{uri} holds no bundle folder; give the location ep publish wrote")
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (pa.ArrowException, OSError) as err:
        raise EnvError(f"download of {uri} failed: {err.__class__.__name__}: {str(err).splitlines()[0]}") from None
    return local
