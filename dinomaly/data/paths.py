"""A dataset root on any pyarrow filesystem, and URIs for the files under it.

Manifest rows carry URIs: plain absolute paths for local files, `s3://bucket/key` (or gs://...) for
object storage, so a manifest written on a laptop for a bucket is readable on every cluster node.
URIs with a scheme are turned into a filesystem by dinomaly.data.storage.filesystem_for (endpoint and
region from the DataConfig or the AWS_* variables).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from dinomaly.config import DataConfig

if TYPE_CHECKING:
    from dinomaly.data.storage import StorageOptions

_SCHEMES = {"local": "", "s3": "s3://", "gcs": "gs://", "hdfs": "hdfs://"}


def _scheme_of(fs: pafs.FileSystem) -> str:
    """URI prefix of paths on `fs` ('' = local)."""
    if fs.type_name in _SCHEMES:
        return _SCHEMES[fs.type_name]
    if fs.type_name.startswith("py::fsspec"):
        protocol = fs.handler.fs.protocol
        protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        return "" if protocol in ("file", "local") else f"{'gs' if protocol == 'gcs' else protocol}://"
    raise ValueError(f"cannot build URIs for a '{fs.type_name}' filesystem; pass a local, S3, GCS or fsspec one")


def filesystem_for_uri(uri: str, data_config: DataConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """URI with a scheme -> (filesystem, path inside it); S3 endpoint/region from `data_config` or AWS_*."""
    from dinomaly.data.storage import filesystem_for

    return filesystem_for(uri, data_config)


@dataclass(frozen=True)
class DataRoot:
    """A folder on a filesystem: `base` is the path inside `fs`, `scheme` the URI prefix of its paths."""

    fs: pafs.FileSystem
    base: str
    scheme: str = ""

    @property
    def uri(self) -> str:
        return self.scheme + self.base

    def path(self, rel: str) -> str:
        return posixpath.join(self.base, rel).rstrip("/") if rel else self.base

    def uri_of(self, rel: str) -> str:
        return self.scheme + self.path(rel)

    def is_dir(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def _entries(self, rel: str, kind: pafs.FileType) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == kind and not i.base_name.startswith("."))

    def subdirs(self, rel: str) -> list[str]:
        """Names of the visible sub-folders of `rel` ([] if it does not exist)."""
        return self._entries(rel, pafs.FileType.Directory)

    def files(self, rel: str) -> list[str]:
        return self._entries(rel, pafs.FileType.File)


def resolve_root(root: str, filesystem: pafs.FileSystem | None = None,
                 data_config: DataConfig | None = None) -> DataRoot:
    """'/data/mvtec', '~/mvtec', 'file:///data', 's3://bucket/mvtec' or a path in `filesystem` -> DataRoot."""
    root = str(root)
    scheme, sep, rest = root.partition("://")
    if not sep:
        scheme, rest = "", root
    if filesystem is not None:
        path = rest if scheme else root
        prefix = _scheme_of(filesystem)
        if not prefix:
            path = os.path.abspath(os.path.expanduser(path))
        return DataRoot(filesystem, path.rstrip("/") or "/", prefix)
    if scheme in ("", "file"):
        return DataRoot(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(rest)), "")
    fs, path = filesystem_for_uri(root, data_config)
    return DataRoot(fs, path.rstrip("/"), _scheme_of(fs))


def read_bytes(uri: str, filesystem: pafs.FileSystem | None = None,
               data_config: DataConfig | StorageOptions | None = None) -> bytes:
    """The whole file at `uri` (a local path or a URI); `filesystem` is used for paths inside it.

    Object-store reads go through dinomaly.data.storage.read_bytes (transient errors retried).
    """
    scheme, sep, rest = uri.partition("://")
    if filesystem is not None:
        with filesystem.open_input_stream(resolve_root(uri, filesystem).base) as stream:
            return stream.readall()
    if not sep or scheme == "file":
        with open(rest if sep else uri, "rb") as handle:
            return handle.read()
    from dinomaly.data.storage import read_bytes as read_object

    return read_object(uri, data_config)
