"""Places in the data location, a local folder or an object store (`s3://bucket/prefix`), read
and written through pyarrow's filesystems: the landing zone and the JSON files maintenance reads.

Credentials and endpoint come from the standard AWS variables (what pyarrow's S3 filesystem reads
itself) or from the workspace's storage options, in LanceDB's names (`aws_endpoint`/`endpoint`,
`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`, `aws_region`/`region`,
`allow_http`), so that one set of options serves the tables and the files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow.fs as pafs

# LanceDB's storage option names (either spelling) -> pyarrow.fs.S3FileSystem's argument.
_S3_ARGUMENTS = {
    "aws_endpoint": "endpoint_override", "endpoint": "endpoint_override", "aws_endpoint_url": "endpoint_override",
    "aws_access_key_id": "access_key", "access_key_id": "access_key",
    "aws_secret_access_key": "secret_key", "secret_access_key": "secret_key",
    "aws_session_token": "session_token", "session_token": "session_token",
    "aws_region": "region", "region": "region",
}


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, *names: str) -> str:
    """`location/name/...` for a folder or a URI alike."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(location).joinpath(*names))


def _s3(storage_options: Mapping[str, str]) -> pafs.S3FileSystem:
    kwargs = {_S3_ARGUMENTS[k]: v for k, v in storage_options.items() if k in _S3_ARGUMENTS}
    endpoint = kwargs.get("endpoint_override", "")
    if endpoint.startswith(("http://", "https://")):
        kwargs["scheme"], kwargs["endpoint_override"] = endpoint.split("://", 1)
    elif str(storage_options.get("allow_http", "")).lower() == "true":
        kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


def filesystem(location: str | Path, storage_options: Mapping[str, str] | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local folder or an object-store URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    scheme, _, path = str(location).partition("://")
    if scheme == "s3" and any(k in _S3_ARGUMENTS for k in storage_options or {}):
        return _s3(storage_options), path.rstrip("/")
    return pafs.FileSystem.from_uri(str(location).rstrip("/"))  # reads the standard AWS variables


def folders(location: str | Path, storage_options: Mapping[str, str] | None = None) -> list[str]:
    """Names of the folders (on S3: the common prefixes) directly under `location`: one listing
    with a delimiter, which does not descend into them."""
    fs, path = filesystem(location, storage_options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)


def is_file(location: str | Path, storage_options: Mapping[str, str] | None = None) -> bool:
    fs, path = filesystem(location, storage_options)
    return fs.get_file_info(path).type == pafs.FileType.File


def files_named(location: str | Path, name: str, storage_options: Mapping[str, str] | None = None) -> Iterator[bytes]:
    """The contents of every file called `name` anywhere below `location` (none when it is missing)."""
    fs, path = filesystem(location, storage_options)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name == name:
            with fs.open_input_stream(info.path) as stream:
                yield stream.read()


def copy_folder(source: str | Path, destination: str | Path, storage_options: Mapping[str, str] | None = None) -> None:
    """Copy a folder's files between a local folder and an object store (either way)."""
    source_fs, source_path = filesystem(source, storage_options)
    destination_fs, destination_path = filesystem(destination, storage_options)
    pafs.copy_files(source_path, destination_path, source_fs, destination_fs)
