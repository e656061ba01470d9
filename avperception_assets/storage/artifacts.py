"""Checkpoints, reports and exports of an object-store data location. torch, json, matplotlib,
onnx and the exporters write local files, so they write to the workspace's working copy (a cache
that mirrors the bucket's layout, `Workspace.working_root`) and the bucket stays the source of
truth: `pull` a folder before reading it, `push` it after writing. Like `aws s3 sync`, a file
is copied when the other side lacks it, holds another size or an older one; each copy takes the
other side's modification time, so an unchanged file is not copied back. For a local data
location the working copy is the data folder itself: both do nothing and no cache is made.

`remove` deletes the project's folders of a data location and its working copy (`make clean`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from avperception_assets.storage import locations
from avperception_assets.workspace import Workspace

PROJECT_FOLDERS = ("landing", "lancedb", "checkpoints", "reports", "exports")  # what `make clean` removes
_PARTIAL = ".tmp"  # the atomic writers' temporary names (`checkpoints.save_torch`): never pushed


def _files(fs: pafs.FileSystem, path: str) -> dict[str, pafs.FileInfo]:
    """{path relative to `path`: info} of every file below `path`; {"": info} when it is a file."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {"": info}
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    return {info.path[len(path):].lstrip("/"): info for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File}


def _newer_or_other(info: pafs.FileInfo, than: pafs.FileInfo | None) -> bool:
    return than is None or info.size != than.size or (info.mtime_ns or 0) > (than.mtime_ns or 0)


def _copy(source_fs: pafs.FileSystem, source: str, destination_fs: pafs.FileSystem, destination: str) -> int:
    """Copy one file; returns the modification time the copy got at `destination`."""
    pafs.copy_files(source, destination, source_fs, destination_fs)
    return destination_fs.get_file_info(destination).mtime_ns


def _both_sides(workspace: Workspace, working_copy: Path) -> tuple[pafs.FileSystem, tuple[pafs.FileSystem, str]]:
    """The local filesystem, and (filesystem, path) of where `working_copy` lives in the bucket."""
    return pafs.LocalFileSystem(), locations.filesystem(workspace.location_of(working_copy), workspace.storage_options)


def pull(workspace: Workspace, working_copy: Path) -> list[str]:
    """Bring a file or folder of the working copy up to date from the bucket: download what it
    lacks, or holds at another size or older. Returns the paths downloaded (relative to it)."""
    if not workspace.is_object_store:
        return []
    local, (fs, remote) = _both_sides(workspace, working_copy)
    here = _files(local, str(working_copy)) if working_copy.exists() else {}
    there = _files(fs, remote)
    stale = [name for name, info in there.items() if _newer_or_other(info, here.get(name))]
    for name in stale:
        source, target = locations.join(remote, name) if name else remote, working_copy / name
        partial = target.with_name(target.name + _PARTIAL)
        partial.parent.mkdir(parents=True, exist_ok=True)
        _copy(fs, source, local, str(partial))
        os.utime(partial, ns=(there[name].mtime_ns, there[name].mtime_ns))
        os.replace(partial, target)  # a reader never sees half a file
    return stale


def push(workspace: Workspace, working_copy: Path) -> list[str]:
    """Upload a file or folder of the working copy to the bucket: what the bucket lacks, or
    holds at another size or older (`Workspace.location_of` names where it lands). Returns the
    paths uploaded (relative to it)."""
    if not workspace.is_object_store:
        return []
    local, (fs, remote) = _both_sides(workspace, working_copy)
    there = _files(fs, remote)
    fresh = [(name, info) for name, info in _files(local, str(working_copy)).items()
             if not name.endswith(_PARTIAL) and _newer_or_other(info, there.get(name))]
    for name, info in fresh:
        mtime_ns = _copy(local, info.path, fs, locations.join(remote, name) if name else remote)
        os.utime(info.path, ns=(mtime_ns, mtime_ns))
    return [name for name, _ in fresh]


def remove(workspace: Workspace, names: Iterable[str] = PROJECT_FOLDERS) -> list[str]:
    """Delete the folders `names` of the data location (on an object store, every object under
    their prefixes) and, for an object store, its working copy in the cache. Returns what was
    there and is gone."""
    removed = []
    for name in names:
        fs, path = locations.filesystem(workspace.location(name), workspace.storage_options)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
            removed.append(workspace.location(name))
    if workspace.is_object_store and workspace.working_root.exists():
        shutil.rmtree(workspace.working_root)
        removed.append(str(workspace.working_root))
    return removed
