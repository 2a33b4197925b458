"""Files whole or absent: every file the project writes goes to a temporary name next to it, is flushed to disk
(``fsync``) and renamed over its final name, so a full disk, a signal or a crash leaves the old file or the new
one, never half of one.

- :func:`write_atomic` / :func:`write_bytes` / :func:`write_text` / :func:`save_tensors`: one file;
- :func:`commit_files`: several files that belong together (a run's artifacts): all are written to temporary
  names first, and only when every one is on disk are they renamed, followed by a manifest that lists them
  (:data:`MANIFEST`, their sizes); a folder whose manifest is missing or disagrees is incomplete
  (:func:`manifest_problem`);
- :func:`ensure_writable`: a folder created and probed before a fit spends time on its first epoch.

Operating-system errors become :class:`~lightning_taylor.errors.WriteError`: the path, what was being written,
the reason in words, and what is intact. The rename is atomic on a POSIX file system when the temporary file is
in the same folder; the folder is fsynced too, so the rename itself survives a power loss.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import tempfile
from typing import IO, Any, Callable, Mapping, Sequence

from lightning_taylor.errors import WriteError

#: The manifest of a folder's committed files (:func:`commit_files`).
MANIFEST = "artifacts.json"

_REASONS = {
    errnos.ENOSPC: "no space left on the device",
    errnos.EDQUOT: "the disk quota is exceeded",
    errnos.EFBIG: "the file is larger than this process may write (file-size limit)",
    errnos.EACCES: "permission denied",
    errnos.EPERM: "operation not permitted",
    errnos.EROFS: "the file system is read-only",
    errnos.ENOTDIR: "a part of the path is a file, not a folder",
    errnos.EISDIR: "the path is a folder",
    errnos.ENOENT: "a folder of the path does not exist",
    errnos.EIO: "an input/output error of the device",
}

Intact = str | Callable[[], str]


def write_error(err: OSError, path: str | os.PathLike, what: str, intact: Intact = "") -> WriteError:
    """``err`` as the project's short error: ``Could not write <what> to <path>: <reason> (ENOSPC). <intact>``."""
    code = err.errno
    if code == errnos.EEXIST and err.filename is not None and not os.path.isdir(err.filename):
        code = errnos.ENOTDIR  # os.makedirs met a file where a folder of the path should be
    reason = _REASONS.get(code, err.strerror or str(err))
    name = f" ({errnos.errorcode[code]})" if code in errnos.errorcode else ""
    where = err.filename if err.filename not in (None, os.fspath(path)) and code == errnos.ENOTDIR else None
    detail = f"{reason}{name}" + (f" at {where}" if where else "")
    note = intact() if callable(intact) else intact
    return WriteError(f"Could not write {what} to {os.fspath(path)}: {detail}. {note}".rstrip(), code)


def temporary_name(path: str | os.PathLike) -> str:
    """A hidden name next to ``path``, unique to this process: ``<folder>/.<name>.<pid>.partial``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.partial")


class _Recording:
    """A binary file that remembers the first ``OSError`` of its writes.

    ``torch.save`` turns a failed write into a ``RuntimeError`` without the errno; this keeps the real cause.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(handle)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _stage(path: str, write: Callable[[Any], Any], what: str, intact: Intact) -> str:
    """Write ``path``'s content to its temporary name, flushed and fsynced; returns that name.

    On any failure the temporary file is removed and an ``OSError`` is raised as :class:`WriteError`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    partial = temporary_name(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with open(partial, "wb") as handle:
            recording = _Recording(handle)
            try:
                write(recording)
            except OSError:
                raise
            except Exception:
                if recording.error is not None:  # a library's wrapper of the write error: the cause counts
                    raise recording.error from None
                raise
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        _remove_quietly(partial)
        raise write_error(err, path, what, intact) from err
    except BaseException:
        _remove_quietly(partial)
        raise
    return partial


def _rename(partial: str, path: str, what: str, intact: Intact) -> None:
    try:
        os.replace(partial, path)
    except OSError as err:
        _remove_quietly(partial)
        raise write_error(err, path, what, intact) from err


def write_atomic(path: str | os.PathLike, write: Callable[[Any], Any], what: str, intact: Intact = "") -> None:
    """Call ``write(handle)`` on a binary file at a temporary name, then rename it to ``path``.

    Args:
        path: the final file; the folder is created if needed.
        write: writes the content to the binary file it is given (``torch.save(obj, handle)``, ...).
        what: what the file is, for the error (``"the checkpoint"``).
        intact: what a failure leaves intact, for the error (or a function returning it, called only then).
    """
    path = os.fspath(path)
    partial = _stage(path, write, what, intact)
    _rename(partial, path, what, intact)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str | os.PathLike, data: bytes, what: str, intact: Intact = "") -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`write_atomic`)."""
    write_atomic(path, lambda handle: handle.write(data), what, intact)


def write_text(path: str | os.PathLike, text: str, what: str, intact: Intact = "") -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all (:func:`write_atomic`)."""
    write_bytes(path, text.encode("utf-8"), what, intact)


def tensor_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``tensors`` as the bytes of a safetensors file (contiguous, on the CPU)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata=dict(metadata) if metadata is not None else None)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None,
                 what: str, intact: Intact = "") -> None:
    """A safetensors file written whole or not at all; serialised in memory first, so that an ``OSError`` (and
    its errno) reaches the caller instead of safetensors' own error text."""
    write_bytes(path, tensor_bytes(tensors, metadata), what, intact)


def commit_files(folder: str | os.PathLike, files: Sequence[tuple[str, bytes, str]], intact: Intact = "") -> None:
    """Write ``files`` (``(name, content, what)``) into ``folder`` together, with the manifest :data:`MANIFEST`.

    Every file goes to its temporary name first; if one fails, all temporary files are removed and the folder
    is as it was. Then the old manifest is removed, the files are renamed into place and the new manifest is
    written last: a folder with a manifest that matches its files holds one complete set.
    """
    folder = os.fspath(folder)
    staged: list[tuple[str, str, str]] = []
    try:
        for name, content, what in files:
            path = os.path.join(folder, name)
            staged.append((_stage(path, lambda handle, c=content: handle.write(c), what, intact), path, what))
    except BaseException:
        for partial, _, _ in staged:
            _remove_quietly(partial)
        raise
    manifest = os.path.join(folder, MANIFEST)
    if os.path.lexists(manifest):
        try:
            os.remove(manifest)  # from here until the new one is written, the folder reads as incomplete
        except OSError as err:
            for partial, _, _ in staged:
                _remove_quietly(partial)
            raise write_error(err, manifest, "the artifacts' manifest", intact) from err
    for index, (partial, path, what) in enumerate(staged):
        try:
            _rename(partial, path, what, intact)
        except WriteError:
            for rest, _, _ in staged[index + 1:]:
                _remove_quietly(rest)
            raise
    listing = {"files": {name: {"bytes": len(content), "what": what} for name, content, what in files}}
    write_text(manifest, json.dumps(listing, indent=2) + "\n", "the artifacts' manifest", intact)


def manifest_problem(folder: str | os.PathLike, names: Sequence[str] = ()) -> str | None:
    """Why ``folder``'s committed files are not one complete set, or ``None`` when they are.

    ``names``: files that, present without a manifest, show an interrupted commit. ``None`` is also returned
    when there is neither a manifest nor any of ``names`` (nothing was committed: nothing is incomplete).
    """
    folder = os.fspath(folder)
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        present = [n for n in names if os.path.exists(os.path.join(folder, n))]
        if present:
            return (f"{', '.join(present)} without {MANIFEST}: their writing was interrupted (or they come from a "
                    "version before the manifest)")
        return None
    try:
        with open(manifest) as handle:
            listed = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, entry in listed.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name}, listed in {MANIFEST}, is missing"
        if os.path.getsize(path) != entry.get("bytes"):
            return f"{name} has {os.path.getsize(path)} bytes, {MANIFEST} says {entry.get('bytes')}"
    return None


def ensure_writable(folder: str | os.PathLike, what: str) -> None:
    """Create ``folder`` (and its parents) and write and remove a probe file in it; a failure is a
    :class:`WriteError` naming ``what`` the folder is for."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise write_error(err, folder, f"{what} (its folder)",
                          "Nothing was trained: choose another folder or fix its permissions.") from err


__all__ = ["MANIFEST", "commit_files", "ensure_writable", "manifest_problem", "save_tensors", "tensor_bytes",
           "temporary_name", "write_atomic", "write_bytes", "write_error", "write_text"]
