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


class EnvError(Exception):
    """The machine, not the input: a missing optional package, a full disk, a read-only or
    unwritable store. A one-line message that names the package or path and the fix; the CLI
    turns it into exit code 1 with no traceback (issue 18, item C7)."""


def require(module: str, extra: str, what: str):
    """Import the optional ``module`` (e.g. ``sae_lens``) and return it; raises EnvError with
    the install hint for the ``ep_store[extra]`` extra when it (or one of its own imports) is
    missing. ``what`` names the feature that needs it (issue 18, item C7)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing = getattr(err, "name", None) or module
        broken = "" if missing.split(".")[0] == module.split(".")[0] else f" ({module} cannot import {missing})"
        raise EnvError(f"{what} needs the optional package {module}{broken}: "
                       f"pip install 'ep_store[{extra}]'") from None


# errno -> (what happened, how to fix it) for the OSErrors the environment causes (issue 18, item C7).
_OS_FIXES = {
    "ENOSPC": ("no space left on the device", "free space or point --store at another disk, then rerun"),
    "EDQUOT": ("disk quota exceeded", "free space or point --store at another disk, then rerun"),
    "EROFS": ("read-only file system", "remount it read-write or point --store at a writable folder"),
    "EACCES": ("permission denied", "fix the folder's permissions or point --store at a writable folder"),
    "EPERM": ("operation not permitted", "fix the folder's permissions or point --store at a writable folder"),
}


def os_error_code(err: OSError) -> str | None:
    """The errno name of ``err`` (``ENOSPC``, ...). Lance raises a bare ``OSError`` whose errno is
    unset and whose message ends ``... (os error 28), <rust source>``: read the number there."""
    import errno
    import re

    number = err.errno
    if number is None:
        found = re.search(r"\(os error (\d+)\)", str(err))
        number = int(found.group(1)) if found else None
    return errno.errorcode.get(number) if number is not None else None


def os_error_line(err: OSError, store=None) -> str | None:
    """One line for an OSError the environment causes (disk full, quota, read-only, no permission):
    what happened, at which path (the error's own, else ``store``), and the fix. None for any
    other OSError (issue 18, item C7)."""
    code = os_error_code(err)
    if code not in _OS_FIXES:
        return None
    what, fix = _OS_FIXES[code]
    path = err.filename or store
    where = f" writing {path}" if path is not None else ""
    return f"{what} ({code}){where}; completed writes were kept and nothing half-written is visible: {fix}"


def differing_options(stored: dict, given: dict, flags: dict[str, str] | None = None) -> str:
    """``--batch-size: stored 2048, given 1024; ...`` for the options whose values differ between
    what a dataset was made with and what this run asks for (a key missing on one side reads
    ``unset``). ``flags`` maps a field name to its CLI option; otherwise ``batch_size`` reads
    ``--batch-size`` (issue 18, item C9)."""
    flags = flags or {}
    parts = []
    for name in sorted(set(stored) | set(given), key=lambda k: (k not in given, str(k))):
        old, new = stored.get(name, "unset"), given.get(name, "unset")
        if old != new:
            flag = flags.get(name, "--" + str(name).replace("_", "-"))
            parts.append(f"{flag}: stored {old}, given {new}")
    return "; ".join(parts) or "no option differs"


def options_changed(what: str, stored: dict, given: dict, flags: dict[str, str] | None = None) -> UsageError:
    """The UsageError for a resume refused because options changed: names only the differing
    options with both values, and the fix (issue 18, item C9)."""
    return UsageError(f"{what} exists with other options ({differing_options(stored, given, flags)}); "
                      "rerun with the stored values to resume, or pass --overwrite to replace it")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and ``timeout`` send), raised in the main thread by the CLI's
    handler. A KeyboardInterrupt, so every cleanup that Ctrl-C runs runs for it too; the CLI
    exits 143 (128 + 15) with one line (issue 18, item C8)."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report a kill by `timeout` or a scheduler
_RERUN = "only completed writes were kept: rerun the command to finish"


def failure_line(err: BaseException, store=None) -> tuple[str, int] | None:
    """(one line, exit code) for a failure the user caused or met, or None for a bug.

    UsageError: exit 2. EnvError and any OSError (disk full, quota, read-only, no permission,
    a file that vanished): exit 1, naming the path (the error's own, else ``store``) and the
    fix. Terminated: exit 143; other KeyboardInterrupt: exit 130 (issue 18, items C7, C8).
    """
    if isinstance(err, UsageError):
        return str(err), 2
    if isinstance(err, EnvError):
        return str(err), 1
    if isinstance(err, Terminated):
        return f"terminated (SIGTERM); {_RERUN}", EXIT_TERMINATED
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted; {_RERUN}", EXIT_INTERRUPTED
    if isinstance(err, OSError):
        line = os_error_line(err, store)
        if line is None:  # an OSError we have no fix for: still one line, with what we know
            import re

            message = re.sub(r",\s*\S+\.rs:\d+:\d+", "", " ".join(str(err).split()))[:300]  # Lance's Rust source
            path = err.filename or store
            line = f"{message}{f' (at {path})' if path is not None and str(path) not in message else ''}; rerun with -vv for details"
        return line, 1
    return None


INT32_MAX = 2**31 - 1  # Arrow/Lance int32 columns (pos, token ids) and Lance's i32 search parameters
INT64_MAX = 2**63 - 1  # Arrow/Lance int64 columns (doc_id, rows)


def check_range(value: int | None, option: str, lo: int, hi: int) -> None:
    """Refuse (UsageError) an integer option outside lo..hi before it reaches Lance or Arrow,
    whose int32/int64 conversions fail with a traceback (issue 18, item C7). None passes."""
    if value is not None and not lo <= value <= hi:
        raise UsageError(f"{option} must lie in {lo}..{hi}, got {value}")
