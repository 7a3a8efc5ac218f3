"""Atomic output folders: a run writes into a hidden sibling folder and renames it into place.

A failed or interrupted run leaves no partial OUT, and an OUT that exists and was not written by
optpipe is refused unless forced (it might be anything the user cares about).

Every OUT carries `manifest.json`: the sha256 and size of each of its files and the versions of
optpipe, torch, onnx, onnxruntime and tvm that wrote it. `check_manifest` (run when an OUT is
loaded) names a damaged or missing file in a one-line `UsageError`, and returns the versions that
differ from those installed now (a newer torch usually reads an older OUT: a warning, not an error).
OUT folders written before manifests existed have none, and load as before.

>>> write_manifest("OUT")                          # doctest: +SKIP
>>> check_manifest("OUT")                          # doctest: +SKIP
['torch 2.12.0 wrote it, 2.13.0 reads it']
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable

from .errors import OptpipeWarning, UsageError
from .version import __version__

MARKER = ".optpipe-out"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "optpipe-manifest/1"
# Package -> the distributions that provide it (the first one installed counts).
VERSIONED = {
    "optpipe": (),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-training", "onnxruntime-gpu"),
    "tvm": ("apache-tvm", "tvm"),
}
# The packages an OUT's artifact depends on, by its target (target.json); torch and optpipe always.
TARGET_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "tvm": ("tvm",), "tvm-cuda": ("tvm",)}


def is_optpipe_out(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def check_writable(out: str, force: bool) -> None:
    """Refuse early (before any work) to overwrite what optpipe did not write."""
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise UsageError(f"output {out} exists and is not a folder", "choose another -o")
        if os.listdir(out) and not is_optpipe_out(out) and not force:
            raise UsageError(
                f"output folder {out} exists and was not written by optpipe",
                "choose another -o, or pass --force to replace it",
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {out}: folder {parent} does not exist", "create it first")


@contextlib.contextmanager
def atomic_folder(out: str, force: bool = False):
    """Yields a temporary folder; on success it replaces `out` as a whole."""
    check_writable(out, force)
    out = os.path.abspath(out)
    parent, base = os.path.split(out)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by optpipe; safe to replace with a new optpipe run\n")
        write_manifest(tmp)
        old = None
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- the manifest ----------------------------------------------------------------------------------------
def installed_versions() -> dict[str, str | None]:
    """{package: version or None} of what `manifest.json` records, read from the installed
    distributions' metadata (nothing heavy is imported)."""
    versions: dict[str, str | None] = {"optpipe": __version__}
    for package, distributions in VERSIONED.items():
        if package == "optpipe":
            continue
        versions[package] = None
        for dist in distributions:
            try:
                versions[package] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_files(folder: str) -> list[str]:
    """Relative paths of the files in `folder` a manifest covers: all but itself and hidden files."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and not (root == folder and name == MANIFEST):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return found


def write_manifest(folder: str, files: Iterable[str] | None = None) -> dict:
    """Write `folder/manifest.json` for `files` (relative paths; default: every file in `folder`
    but hidden ones) and return it. Call it last, once nothing more is written into the folder."""
    names = _folder_files(folder) if files is None else sorted(f.replace(os.sep, "/") for f in files)
    manifest = {
        "format": MANIFEST_FORMAT,
        "versions": installed_versions(),
        "files": {
            name: {
                "sha256": file_sha256(os.path.join(folder, name)),
                "bytes": os.path.getsize(os.path.join(folder, name)),
            }
            for name in names
        },
    }
    write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: str) -> dict | None:
    """`folder/manifest.json`, or None for an OUT written before manifests. A damaged one is a UsageError."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"damaged file: {path} is not readable JSON ({e})", _REWRITE_HINT) from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UsageError(f"damaged file: {path} is not an optpipe manifest (no 'files')", _REWRITE_HINT)
    return manifest


_REWRITE_HINT = "it was changed or cut short after optpipe wrote it; copy it again, or write OUT again with optpipe"


def check_manifest(folder: str, files: Iterable[str] | None = None) -> list[str]:
    """Check `folder`'s files against its manifest (only `files`, when given, of those it lists).

    Raises UsageError naming the first file that is missing or whose sha256 differs. Returns one
    text per package whose version differs from the one that wrote `folder` (empty: no manifest,
    or nothing differs); `warn_version_drift` turns them into a warning."""
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    listed = manifest["files"]
    wanted = listed if files is None else [f for f in files if f in listed]
    for name in wanted:
        entry = listed[name] if isinstance(listed[name], dict) else {}
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UsageError(f"damaged OUT folder: {path} is missing (listed in {MANIFEST})", _REWRITE_HINT)
        size = os.path.getsize(path)
        if entry.get("bytes") not in (None, size):
            raise UsageError(f"damaged file: {path} has {size} bytes, {MANIFEST} says {entry['bytes']}", _REWRITE_HINT)
        if entry.get("sha256") != file_sha256(path):
            raise UsageError(f"damaged file: {path} does not match its sha256 in {MANIFEST}", _REWRITE_HINT)
    return version_drift(manifest.get("versions") or {}, _target_of(folder))


def version_drift(recorded: dict, target: str | None = None) -> list[str]:
    """'torch 2.12.0 wrote it, 2.13.0 reads it' for each package the OUT depends on whose installed
    version differs from `recorded` (packages missing on either side are left to the target to report)."""
    now = installed_versions()
    packages = ("optpipe", "torch", *TARGET_PACKAGES.get(target or "", ()))
    return [
        f"{package} {recorded[package]} wrote it, {now[package]} reads it"
        for package in packages
        if recorded.get(package) and now.get(package) and str(recorded[package]) != now[package]
    ]


def warn_version_drift(folder: str, drift: list[str]) -> None:
    """One `OptpipeWarning` (the CLI prints `optpipe: warning: ...`) listing every version that differs."""
    if drift:
        warnings.warn(
            f"{folder} was written by other versions: {'; '.join(drift)} (if it misbehaves, write it again)",
            OptpipeWarning,
            stacklevel=3,
        )


def verify_out(folder: str, files: Iterable[str] | None = None) -> None:
    """`check_manifest`, with any version drift issued as a warning."""
    warn_version_drift(folder, check_manifest(folder, files))


def _target_of(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "target.json"), encoding="utf-8") as f:
            target = json.load(f).get("target")
    except (OSError, ValueError, AttributeError):
        return None
    return target if isinstance(target, str) else None
