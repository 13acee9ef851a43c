"""One way from a URI to bytes: local paths, file://, s3:// (AWS, MinIO, moto, any S3-compatible store), gs://.

Every reader in dinomaly (layouts, manifest, the torch Dataset, the Ray Data pipeline) goes through
`filesystem_for`, so a folder on a shared disk and a bucket prefix take the same code path.

S3 settings come from the config first (`data.endpoint_url`, `data.region`), then the standard AWS
variables: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_DEFAULT_REGION / AWS_REGION, AWS_ACCESS_KEY_ID +
AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN); without keys, the AWS SDK's own chain (AWS_PROFILE,
~/.aws/credentials, instance metadata) applies. `StorageOptions` freezes those values on the driver so
Ray workers, whose environment may differ, build the same filesystem.
gs:// uses pyarrow's GcsFileSystem with Google's default credentials; it is not exercised by the tests.
"""

from __future__ import annotations

import configparser
import functools
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dinomaly.config import DataConfig

logger = logging.getLogger(__name__)

READ_ATTEMPTS = 4  # read_bytes: whole-file attempts, on top of the SDK's per-request retries
UPLOAD_THREADS = 16  # upload_tree to an object store: files in flight (each a round trip or more)
UPLOAD_CHUNK_BYTES = 8 * 1024**2
S3_REQUEST_ATTEMPTS = 5  # pyarrow's AwsStandardS3RetryStrategy: throttling, 5xx, dropped connections
_BACKOFF_S = 0.2

# AWS error codes that no retry can fix (pyarrow raises OSError("... AWS Error <CODE> ...")).
_PERMANENT = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "NO_SUCH_BUCKET",
              "NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "INVALID_PARAMETER", "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT",
              "InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch", "NoSuchBucket")
_CREDENTIAL_ERRORS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN",
                      "UNRECOGNIZED_CLIENT", "InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch",
                      "HTTP response code: 403")
_NETWORK_ERRORS = ("NETWORK_CONNECTION", "Couldn't connect", "curlCode: 7", "Connection refused",
                   "Could not resolve host", "Timeout was reached", "curlCode: 28")


@dataclass(frozen=True)
class StorageOptions:
    """Resolved object-store settings; picklable, so the driver's view travels to every Ray worker.

    Credentials are copied from the driver's environment only when it sets them; otherwise each
    process uses the AWS SDK's default chain.
    """

    endpoint_url: str = ""  # e.g. http://127.0.0.1:9000 (MinIO); '' = AWS
    region: str = ""
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    @classmethod
    def resolve(cls, data_config: DataConfig | StorageOptions | None = None) -> StorageOptions:
        """Config values first, then the AWS_* variables of this process."""
        if isinstance(data_config, StorageOptions):
            return data_config
        env = os.environ
        endpoint = (data_config.endpoint_url if data_config else "") or env.get("AWS_ENDPOINT_URL_S3", "") \
            or env.get("AWS_ENDPOINT_URL", "")
        region = (data_config.region if data_config else "") or env.get("AWS_DEFAULT_REGION", "") \
            or env.get("AWS_REGION", "")
        key, secret = env.get("AWS_ACCESS_KEY_ID") or None, env.get("AWS_SECRET_ACCESS_KEY") or None
        if (key is None) != (secret is None):
            have, lack = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")[:: 1 if key else -1]
            raise ValueError(f"credentials are unreadable: {have} is set but {lack} is not; set both "
                             "(or neither, to use AWS_PROFILE / ~/.aws/credentials)")
        return cls(endpoint_url=endpoint, region=region or "us-east-1", access_key=key, secret_key=secret,
                   session_token=env.get("AWS_SESSION_TOKEN") or None)


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/key' -> ('s3', 'bucket/key'); '/data/x' and 'file:///data/x' -> ('', '/data/x')."""
    scheme, sep, rest = str(uri).partition("://")
    if not sep:
        return "", os.path.abspath(os.path.expanduser(str(uri)))
    scheme = scheme.lower()
    if scheme == "file":
        return "", os.path.abspath(rest or "/")
    if scheme in ("s3", "s3a"):
        return "s3", rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return "gs", rest.rstrip("/")
    raise ValueError(f"unsupported URI scheme '{scheme}://' in {uri!r}; use a local path, file://, s3:// or gs://")


def storage_uri(path: str | None, storage_root: str) -> str | None:
    """A path on Ray's storage as a full URI: Ray reports object-store paths as 'bucket/key', which would read
    like a relative local folder; the scheme comes from the storage root (output_root)."""
    scheme = split_uri(storage_root)[0]
    if not path or not scheme or "://" in path:
        return path
    return f"{scheme}://{path}"


def _endpoint_parts(endpoint_url: str) -> tuple[str | None, str]:
    """'http://127.0.0.1:9000' -> ('127.0.0.1:9000', 'http'); 'minio:9000' -> ('minio:9000', 'https')."""
    if not endpoint_url:
        return None, "https"
    parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"S3 endpoint {endpoint_url!r} is not a URL like http://host:port; fix data.endpoint_url "
                         "or AWS_ENDPOINT_URL")
    return parsed.netloc, parsed.scheme


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: StorageOptions) -> pafs.S3FileSystem:
    # one filesystem (connection pool, credential provider) per settings, shared by every read
    endpoint, scheme = _endpoint_parts(options.endpoint_url)
    return pafs.S3FileSystem(
        access_key=options.access_key, secret_key=options.secret_key, session_token=options.session_token,
        region=options.region, endpoint_override=endpoint, scheme=scheme, connect_timeout=2.0,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_REQUEST_ATTEMPTS))


@functools.lru_cache(maxsize=1)
def _gcs_filesystem() -> pafs.FileSystem:
    return pafs.GcsFileSystem()


def filesystem_for(uri: str, data_config: DataConfig | StorageOptions | None = None
                   ) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it); S3 paths are 'bucket/key', local paths absolute."""
    scheme, path = split_uri(uri)
    if scheme == "":
        return pafs.LocalFileSystem(), path
    if scheme == "s3":
        return _s3_filesystem(StorageOptions.resolve(data_config)), path
    return _gcs_filesystem(), path


def open_uri(uri: str, data_config: DataConfig | StorageOptions | None = None) -> pafs.NativeFile:
    """An input stream on `uri` (use as a context manager)."""
    fs, path = filesystem_for(uri, data_config)
    return fs.open_input_stream(path)


def is_transient(err: OSError) -> bool:
    """False for errors a retry cannot fix (missing file or bucket, denied access)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = str(err)
    return not any(code in text for code in _PERMANENT)


def read_bytes(uri: str, data_config: DataConfig | StorageOptions | None = None,
               attempts: int = READ_ATTEMPTS) -> bytes:
    """The whole object at `uri`, retrying transient failures (dropped connections mid-body, 5xx)."""
    fs, path = filesystem_for(uri, data_config)
    for attempt in range(1, attempts + 1):
        try:
            with fs.open_input_stream(path) as stream:
                return stream.readall()
        except OSError as err:
            if attempt == attempts or not is_transient(err):
                raise
            logger.warning("reading %s failed (attempt %d/%d), retrying: %s", uri, attempt, attempts, err)
            time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # the loop returns or raises


def list_files(uri: str, suffixes: tuple[str, ...] | list[str] | None = None,
               data_config: DataConfig | StorageOptions | None = None) -> list[str]:
    """URIs of the files under `uri` (recursive, sorted, hidden names skipped), optionally by suffix."""
    fs, base = filesystem_for(uri, data_config)
    scheme = split_uri(uri)[0]
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or info.base_name.startswith("."):
            continue
        if wanted and not info.path.lower().endswith(wanted):
            continue
        out.append(f"{scheme}://{info.path}" if scheme else info.path)
    return sorted(out)


def upload_tree(local_root: str | os.PathLike, dest_uri: str,
                data_config: DataConfig | StorageOptions | None = None) -> int:
    """Copy every file under `local_root` to `dest_uri` (keeping relative paths); returns the file count."""
    root = Path(local_root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"cannot upload {root}: not a folder; pass the dataset root to --upload-to")
    dest_fs, dest = filesystem_for(dest_uri, data_config)
    scheme = split_uri(dest_uri)[0]
    if scheme:  # the bucket must exist; a local destination is created
        check_reachable(f"{scheme}://{dest.split('/', 1)[0]}", data_config)
    files = [p for p in root.rglob("*") if p.is_file()]
    if scheme:  # one object per file: copy_files would also leave an empty marker object for every folder
        def put(path: Path) -> None:
            with path.open("rb") as source, dest_fs.open_output_stream(f"{dest}/{path.relative_to(root).as_posix()}"
                                                                       ) as target:
                shutil.copyfileobj(source, target, UPLOAD_CHUNK_BYTES)

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(put, files))
    else:
        pafs.copy_files(str(root), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs,
                        use_threads=True)
    count = len(files)
    logger.info("uploaded %d files from %s to %s", count, root, dest_uri)
    return count


def unwritable_part(folder: Path) -> Path | None:
    """The nearest existing part of local `folder` when it is not a writable folder (the rest of `folder` would
    be created under it), else None."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    return None if existing.is_dir() and os.access(existing, os.W_OK) else existing


def check_output_writable(output: str, data_config: DataConfig | StorageOptions | None = None) -> None:
    """Fail before any cluster work when the folder or prefix `output` cannot be written. An object-store prefix
    gets a probe object, written and deleted: reachable, readable credentials may still lack write permission."""
    scheme, path = split_uri(output)
    if not scheme:
        blocking = unwritable_part(Path(path))
        if blocking is not None:
            raise PermissionError(f"cannot write --output {path}: {blocking} is not a writable folder; "
                                  "choose another --output")
        return
    check_reachable(f"{scheme}://{path.split('/', 1)[0]}", data_config)  # the bucket; the prefix may be new
    fs, probe = filesystem_for(f"{output}/.write-check", data_config)
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        delete_object(fs, probe)
    except OSError as err:
        raise PermissionError(f"cannot write to --output {output} ({str(err).strip()}); check that the "
                              "credentials may write to that bucket, or choose another --output") from err


def delete_object(fs: pafs.FileSystem, path: str) -> None:
    """Delete one object, and the folder markers deleting it leaves where no file remains.

    pyarrow's S3 filesystem writes an empty marker object for the parent folder of what it deletes (a folder
    that holds files keeps it: pyarrow cannot delete a marker alone); the highest folder below the bucket that
    holds no file is removed whole."""
    fs.delete_file(path)
    if not isinstance(fs, pafs.S3FileSystem):
        return
    parts = path.split("/")[:-1]  # bucket, folders...
    for depth in range(2, len(parts) + 1):  # from the top folder down: the first empty one holds the rest
        folder = "/".join(parts[:depth])
        inside = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
        if not any(info.type == pafs.FileType.File for info in inside):
            fs.delete_dir(folder)
            return


def _check_profile(options: StorageOptions) -> None:
    """Without explicit keys, AWS_PROFILE must name a profile that exists in a readable file."""
    profile = os.environ.get("AWS_PROFILE")
    if options.access_key or not profile:
        return
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    sections = set()
    for name in files:
        path = Path(name).expanduser()
        if not path.exists():
            continue
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error) as err:
            raise ValueError(f"credentials are unreadable: cannot parse {path}: {err}") from err
        sections |= {s.removeprefix("profile ") for s in parser.sections()}
    if profile not in sections:
        raise ValueError(f"credentials are unreadable: AWS_PROFILE={profile!r} is not in {files}; fix the "
                         "profile name or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def check_reachable(uri: str, data_config: DataConfig | StorageOptions | None = None) -> None:
    """Fail fast, on the driver and before any cluster work, when `uri` cannot be read.

    Raises FileNotFoundError (missing folder, bucket or prefix), PermissionError (credentials
    rejected), ConnectionError (endpoint unreachable) or ValueError (credentials unreadable), each
    naming the URI and the fix.
    """
    scheme, path = split_uri(uri)
    if scheme == "":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; check data.root / the manifest path")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path} is not readable by this user; fix its permissions")
        return
    options = StorageOptions.resolve(data_config) if scheme == "s3" else None
    if options is not None:
        _check_profile(options)
    fs, _ = filesystem_for(uri, options)
    bucket = path.split("/", 1)[0]
    where = f"{scheme}://{bucket}" + (f" at endpoint {options.endpoint_url}" if options and options.endpoint_url
                                      else "")
    try:
        bucket_info = fs.get_file_info(bucket)
        info = fs.get_file_info(path) if path != bucket else bucket_info
    except OSError as err:
        text = str(err)
        if any(code in text for code in _CREDENTIAL_ERRORS):
            raise PermissionError(f"access to {where} was denied ({text.strip()}); check AWS_ACCESS_KEY_ID / "
                                  "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket policy") from err
        if any(code in text for code in _NETWORK_ERRORS):
            raise ConnectionError(f"cannot reach the object store for {where} ({text.strip()}); check "
                                  "data.endpoint_url / AWS_ENDPOINT_URL and the network") from err
        raise OSError(f"cannot access {uri}: {text.strip()}") from err
    if bucket_info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"bucket {where} does not exist; create it or fix the bucket name in {uri}")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist (no object or prefix of that name); check the path")
