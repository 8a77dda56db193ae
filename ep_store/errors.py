"""The one exception type that means "the user asked for something we cannot do".

Library code raises `UsageError` with a one-line message that says what is wrong and how to
fix it; the CLI turns it into exit code 2 with no traceback. Raise it before anything is
written, so that bad input leaves the store exactly as it was.
"""


class UsageError(Exception):
    """Bad input: a clear one-line message, exit code 2, nothing written."""


def _blocking_ancestor(path) -> object | None:
    """The nearest existing ancestor of ``path`` that is not a folder (so nothing can go under it)."""
    from pathlib import Path

    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: an existing folder,
    or a path under an existing file. Raises UsageError naming ``option`` (e.g. ``--out``)."""
    from pathlib import Path

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; pass a file name")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
    _check_creatable(path, option)


def _check_creatable(path, option: str) -> None:
    """Refuse an output whose nearest existing folder cannot take a new file (permissions, a
    read-only or special file system such as /proc): probe with a temporary file there."""
    import tempfile
    from pathlib import Path

    folder = next((p for p in Path(path).absolute().parents if p.exists()), None)
    if folder is None:
        return
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ep-probe-"):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write in {folder}: {err.strerror or err}") from None


def check_output_folder(path, option: str) -> None:
    """Refuse, before any work, an output folder path that cannot be made: an existing file, or
    a path under an existing file. Raises UsageError naming ``option`` (e.g. ``--out``)."""
    from pathlib import Path

    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; pass a folder")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
