"""Artifacts: the files isearle writes, written atomically and verified when read.

Every write goes to a temporary file in the target's folder, is fsync'ed, renamed over the target
(`os.replace`) and the folder is fsync'ed: a reader or a crash (`kill -9`, power loss) sees the old
file or the new one, never half of one. Tensor files (safetensors) carry their kind, a format
version and a SHA-256 of their tensors in their metadata; a set of files that belong together (a
gallery index) is written as a group whose manifest records each file's size and SHA-256, and is
committed by one rename (a crash between renames is rolled forward on the next open). Files
written before checksums existed (legacy) are verified against a `checksums.json` in their folder
when one lists them (the bundled models), else read with one warning in the log. Reading a
missing, empty, truncated, foreign, newer or corrupt artifact raises `ArtifactError`, one line that
names the file, says what is wrong and what to do. Metadata is written in a fixed (sorted) order, so
identical content gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from isearle.errors import IsearleError

log = logging.getLogger(__name__)

#: Format version of the metadata this module writes; files without one are legacy (version 0).
FORMAT = 1
#: Files above this size are checked by size only when opened (hashing GBs would defeat mmap);
#: `ISEARLE_VERIFY=full` hashes every file, `ISEARLE_VERIFY=size` none.
HASH_LIMIT = 256 * 2**20
_KEY = "isearle"  # safetensors metadata key holding {"kind", "format", "sha256"}
#: A folder's list of legacy files and their {"size", "sha256"}: {"format": 1, "files": {name: record}}
CHECKSUMS = "checksums.json"
_warned: set[str] = set()  # legacy files already reported as unverified (once per process)


class ArtifactError(IsearleError, ValueError):
    """A file isearle wrote is missing, damaged or incompatible; the message says what to do."""

    def __init__(self, path: str | Path, problem: str, remedy: str) -> None:
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{display(path)} {problem}: {remedy}")


def display(path: str | Path) -> str:
    """`path` relative to the working folder when under it (what a user typed), else absolute."""
    p = Path(path)
    with contextlib.suppress(ValueError, OSError):
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    return str(p)


# ------------------------------------------------------------------------------- writing
def fsync_dir(directory: str | Path) -> None:
    """Make a rename in `directory` durable (no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(directory), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to `path`; when the block ends without error it replaces `path`
    (fsync file, rename, fsync folder); on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600: give the file what `open` would (umask applied)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """0666 less the process umask: the mode of a file created with `open` (read once; umask is per process)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`data` as JSON (UTF-8), atomically."""
    return write_text(path, json.dumps(data, ensure_ascii=False, **dumps))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """What a manifest records about a file: {"size", "sha256"}."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


# ------------------------------------------------------------------------------- reading
def _hash_this(size: int) -> bool:
    mode = os.environ.get("ISEARLE_VERIFY", "auto")
    return mode == "full" or (mode != "size" and size <= HASH_LIMIT)


def check_file(path: str | Path, record: Mapping[str, Any] | None, remedy: str) -> None:
    """Raise ArtifactError unless `path` exists, is not empty and matches `record` (size, SHA-256)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(path, "is missing", remedy)
    size = path.stat().st_size
    if size == 0:
        raise ArtifactError(path, "is empty", remedy)
    if not record:
        return
    want = int(record["size"])
    if size < want:
        raise ArtifactError(path, f"is truncated ({size:,} of {want:,} bytes)", remedy)
    if size != want:
        raise ArtifactError(path, f"has the wrong size ({size:,} bytes, {want:,} expected)", remedy)
    if record.get("sha256") and _hash_this(size) and sha256_file(path) != record["sha256"]:
        raise ArtifactError(path, "is corrupt (its SHA-256 does not match the one recorded)", remedy)


def read_json(path: str | Path, remedy: str, record: Mapping[str, Any] | None = None) -> Any:
    """Parsed JSON of `path` (checked against `record` first when given), or ArtifactError."""
    path = Path(path)
    check_file(path, record if record is not None else listed_record(path), remedy)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(path, "is not a JSON file (binary content)", remedy) from None
    except json.JSONDecodeError as err:
        raise ArtifactError(path, f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
                            remedy) from None


def check_format(path: str | Path, version: Any, supported: int, remedy: str) -> None:
    """ArtifactError unless `version` is an int in [0, supported] (0: legacy, before versions)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ArtifactError(path, f"has an unknown format version {version!r}", remedy)
    if version > supported:
        raise ArtifactError(path, f"was written by a newer isearle (format {version}, this one reads "
                            f"up to {supported})", f"upgrade isearle, or {remedy}")


# ------------------------------------------------------------------------------- tensors
def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of `tensors` (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], kind: str,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """A safetensors file of `kind` with its format and tensors' SHA-256, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), _KEY: json.dumps({"kind": kind, "format": FORMAT, "sha256": tensors_digest(state)})}
    return write_bytes(path, tensors_bytes(state, meta))


def tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors file's bytes with its header in a fixed order (metadata keys sorted, then the
    tensors by name): `safetensors` itself writes metadata in hash order, so two identical runs
    would give files that differ in their bytes and checksums."""
    from safetensors.torch import save

    blob = save(dict(tensors))
    (n,) = struct.unpack("<Q", blob[:8])
    entries = json.loads(blob[8:8 + n])
    entries.pop("__metadata__", None)
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    header.update((k, entries[k]) for k in sorted(entries))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _safetensors_header(path: Path, remedy: str) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking that the file holds all it announces."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(path, f"is truncated ({size} bytes)", remedy)
        (n,) = struct.unpack("<Q", head)
        first = f.read(min(n, 1 << 26))
    if not first.startswith(b"{"):
        raise ArtifactError(path, "is not a safetensors file", remedy)
    if 8 + n > size:
        raise ArtifactError(path, f"is truncated ({size:,} bytes, its header alone announces {8 + n:,})", remedy)
    try:
        header = json.loads(first)
    except ValueError:
        raise ArtifactError(path, "is not a safetensors file (unreadable header)", remedy) from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise ArtifactError(path, f"is truncated ({size:,} of {8 + n + end:,} bytes)", remedy)
    if size > 8 + n + end:
        raise ArtifactError(path, f"has the wrong size ({size:,} bytes, {8 + n + end:,} expected)", remedy)
    return header


def tensors_metadata(path: str | Path, remedy: str) -> dict[str, str]:
    """The string metadata of a safetensors file (checked for truncation, not hashed)."""
    path = Path(path)
    check_file(path, None, remedy)
    return dict(_safetensors_header(path, remedy).get("__metadata__") or {})


def load_tensors(path: str | Path, kind: str, remedy: str,
                 accept: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file written by `save_tensors` as `kind` (or one of
    `accept`), verified: present, complete, of that kind and a known format, checksum matching.
    Files without isearle metadata (written before it existed) are read unverified."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = tensors_metadata(path, remedy)
    own = None
    if _KEY in meta:
        try:
            own = json.loads(meta[_KEY])
        except ValueError:
            raise ArtifactError(path, "has unreadable isearle metadata", remedy) from None
        if own.get("kind") not in (kind, *accept):
            raise ArtifactError(path, f"is a {own.get('kind')} file, not a {kind}", remedy)
        check_format(path, own.get("format"), FORMAT, remedy)
    else:
        check_legacy(path, remedy)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # SafetensorError and friends: the bytes are not what the header says
        raise ArtifactError(path, f"is damaged ({str(err).splitlines()[0][:120]})", remedy) from None
    if own is not None and own.get("sha256") and own["sha256"] != tensors_digest(tensors):
        raise ArtifactError(path, "is corrupt (its tensors' SHA-256 does not match the one recorded)", remedy)
    return tensors, {k: v for k, v in meta.items() if k != _KEY}


# ------------------------------------------------------------------------------- legacy files
def listed_record(path: str | Path) -> dict[str, Any] | None:
    """`path`'s {"size", "sha256"} in the `checksums.json` of its folder, None when not listed."""
    path = Path(path)
    manifest = path.parent / CHECKSUMS
    if path.name == CHECKSUMS or not manifest.is_file():
        return None
    st = manifest.stat()
    record = _checksums(str(manifest), st.st_size, st.st_mtime_ns).get(path.name)
    return dict(record) if isinstance(record, dict) else None


@functools.lru_cache(maxsize=32)
def _checksums(manifest: str, size: int, mtime_ns: int) -> dict[str, Any]:
    data = read_json(manifest, "restore it from the repository (git checkout)")
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(manifest, "is not a checksum list", "restore it from the repository (git checkout)")
    return files


def check_legacy(path: str | Path, remedy: str) -> bool:
    """Verify a file that carries no checksum of its own against its folder's `checksums.json`
    (size and SHA-256 always hashed: such lists name small bundled files); unlisted, say once in
    the log that it is read unverified. Returns whether it was verified."""
    path = Path(path)
    record = listed_record(path)
    if record is not None:
        check_file(path, {"size": record["size"]}, remedy)
        if sha256_file(path) != record.get("sha256"):
            raise ArtifactError(path, f"is corrupt (its SHA-256 does not match the one in {CHECKSUMS})", remedy)
        return True
    key = str(path.resolve())
    if key not in _warned:
        _warned.add(key)
        log.warning("%s is in the legacy format without a checksum: it is read unverified (save it again "
                    "with this isearle, or list it in a %s next to it)", display(path), CHECKSUMS)
    return False


def write_checksums(directory: str | Path, names: Iterable[str]) -> Path:
    """`directory/checksums.json` listing `names` (files of that folder) with their size and SHA-256."""
    directory = Path(directory)
    files = {name: file_record(directory / name) for name in sorted(names)}
    return write_json(directory / CHECKSUMS, {"format": FORMAT, "files": files}, indent=1)


# ------------------------------------------------------------------------------- file groups
def write_group(directory: str | Path, writers: Mapping[str, Callable[[Path], None]], manifest: str,
                header: dict[str, Any]) -> dict[str, Any]:
    """Replace several files of `directory` together, committed by their manifest.

    Each `writers[name](path)` writes one file to a temporary path; the manifest (`header` plus
    "files": {name: {"size", "sha256"}}) is then written as `manifest.pending` (the commit point),
    the files are renamed into place and the manifest last. A crash before the commit leaves the
    old group; after it, `recover_group` finishes the renames. Returns the manifest written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover_group(directory, manifest, writers)
    files = {}
    for name, write in writers.items():
        new = directory / f"{name}.new"
        new.unlink(missing_ok=True)
        write(new)
        _fsync_file(new)
        files[name] = file_record(new)
    data = {**header, "files": files}
    write_json(directory / f"{manifest}.pending", data)  # the commit point
    _finish_group(directory, manifest, list(files))
    return data


def _finish_group(directory: Path, manifest: str, names: Iterable[str]) -> None:
    """Rename a committed group's files into place, the manifest last."""
    for name in names:
        new = directory / f"{name}.new"
        if new.is_file():
            os.replace(new, directory / name)
    fsync_dir(directory)
    os.replace(directory / f"{manifest}.pending", directory / manifest)
    fsync_dir(directory)


def recover_group(directory: str | Path, manifest: str, names: Iterable[str] = ()) -> None:
    """Finish a group write that a crash interrupted after its commit, or drop the temporary
    files (`names` + ".new") of one that did not commit."""
    directory = Path(directory)
    pending = directory / f"{manifest}.pending"
    if pending.is_file():
        try:
            committed = list(json.loads(pending.read_text(encoding="utf-8")).get("files", {}))
        except (OSError, ValueError, AttributeError):
            committed = None  # cannot happen for a file written by write_json; drop it
        if committed is not None:
            _finish_group(directory, manifest, committed)
            log.warning("%s: finished a write that was interrupted", display(directory))
            return
        pending.unlink(missing_ok=True)
    for name in names:
        (directory / f"{name}.new").unlink(missing_ok=True)


# ------------------------------------------------------------------------------- resumable jobs
class Progress:
    """The finished pieces of a resumable job (one verified safetensors file per piece) in a folder.

    The folder belongs to one job, named by `job` (what its results depend on): opening it for
    another job clears it. A run killed at any moment keeps every piece finished before; the next
    run of the same job skips them. `discard()` removes the folder once the result is saved.
    """

    def __init__(self, directory: str | Path, job: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.job = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()
        manifest = self.directory / "job.json"
        try:
            same = json.loads(manifest.read_text(encoding="utf-8")).get("job") == self.job
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            if self.directory.exists():
                log.info("%s: progress of another job, starting over", display(self.directory))
                shutil.rmtree(self.directory)
            write_json(manifest, {"job": self.job, "format": FORMAT})

    def path(self, piece: int) -> Path:
        return self.directory / f"piece_{piece:06d}.safetensors"

    def has(self, piece: int) -> bool:
        """Whether piece `piece` is finished (present and complete; its checksum is read by `load`)."""
        try:
            tensors_metadata(self.path(piece), "")
        except ArtifactError:
            return False
        return True

    def save(self, piece: int, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
        save_tensors(self.path(piece), tensors, "progress", {"meta": json.dumps(meta)})

    def load(self, piece: int) -> tuple[dict[str, torch.Tensor], Any]:
        """A finished piece; a damaged one is deleted and reported (the next run redoes it)."""
        try:
            tensors, meta = load_tensors(self.path(piece), "progress", "")
        except ArtifactError as err:
            self.path(piece).unlink(missing_ok=True)
            raise ArtifactError(err.path, err.problem, "it was deleted: run the command again to redo it") from None
        return tensors, json.loads(meta["meta"])

    @staticmethod
    def discard(directory: str | Path) -> None:
        """Remove a job's progress folder (its result is saved)."""
        shutil.rmtree(directory, ignore_errors=True)
