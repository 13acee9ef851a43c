"""dinomaly.data.storage against the local disk and a real S3 server (moto, tests/fixtures_s3.py)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from dinomaly.config import DataConfig
from dinomaly.data import storage
from dinomaly.data.storage import (
    StorageOptions,
    check_reachable,
    filesystem_for,
    list_files,
    read_bytes,
    upload_tree,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "one.png").write_bytes(b"\x89PNG one")
    (root / "a" / "b" / "two.JPG").write_bytes(b"jpeg two")
    (root / "notes.txt").write_text("text")
    (root / ".hidden").write_text("skip me")
    return root


@pytest.fixture(scope="module")
def uploaded(tree, moto_s3):
    return upload_tree(tree, moto_s3.uri("storage/tree")), moto_s3.uri("storage/tree")


def test_uri_forms_resolve_to_filesystems(tmp_path):
    fs, path = filesystem_for(f"file://{tmp_path}/x.png")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x.png"
    assert filesystem_for(str(tmp_path / "x.png"))[1] == f"{tmp_path}/x.png"
    options = StorageOptions(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", access_key="k", secret_key="s")
    fs, path = filesystem_for("s3://bucket/some/key.png", options)
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key.png"
    assert fs.region == "eu-west-1"
    with pytest.raises(ValueError, match="ftp://"):
        filesystem_for("ftp://host/x")
    with pytest.raises(ValueError, match="not a URL"):
        filesystem_for("s3://b/k", StorageOptions(endpoint_url="ftp://host:1"))


def test_settings_come_from_config_then_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    from_env = StorageOptions.resolve(None)
    assert (from_env.endpoint_url, from_env.region, from_env.access_key) == ("http://s3-specific:2", "ap-south-1", "key")
    from_config = StorageOptions.resolve(DataConfig(endpoint_url="http://minio:9000", region="eu-central-1"))
    assert (from_config.endpoint_url, from_config.region) == ("http://minio:9000", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert StorageOptions.resolve(None).endpoint_url == "http://generic:1"


def test_local_and_s3_list_and_read_the_same_files(tree, uploaded, moto_s3):
    count, s3_root = uploaded
    assert count == 4  # hidden files are uploaded too, but never listed
    keys = [obj["Key"] for obj in moto_s3.client().list_objects_v2(
        Bucket=moto_s3.bucket, Prefix="storage/tree/")["Contents"]]
    assert sorted(keys) == ["storage/tree/.hidden", "storage/tree/a/b/two.JPG", "storage/tree/a/one.png",
                            "storage/tree/notes.txt"], "one object per file, no empty folder markers"
    local = list_files(str(tree), [".png", ".jpg"])
    remote = list_files(s3_root, [".png", ".jpg"])
    assert [u.removeprefix(str(tree)) for u in local] == [u.removeprefix(s3_root) for u in remote] == \
        ["/a/b/two.JPG", "/a/one.png"]
    assert [read_bytes(u) for u in local] == [read_bytes(u) for u in remote] == [b"jpeg two", b"\x89PNG one"]
    with storage.open_uri(remote[1]) as stream:
        assert stream.read() == b"\x89PNG one"


def test_missing_local_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        check_reachable(str(tmp_path / "does-not-exist"))


def test_missing_bucket_and_prefix_are_clear_errors(moto_s3):
    with pytest.raises(FileNotFoundError, match=r"bucket s3://no-such-bucket .*does not exist"):
        check_reachable("s3://no-such-bucket/mvtec")
    with pytest.raises(FileNotFoundError, match="no-such-prefix"):
        check_reachable(moto_s3.uri("no-such-prefix"))
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        upload_tree(".", "s3://no-such-bucket/x")


def test_rejected_credentials_are_a_permission_error(moto_s3, uploaded):
    moto_s3.set_auth(True)  # moto now checks keys: 'testing' is not a known IAM key
    try:
        with pytest.raises(PermissionError, match="denied.*AWS_ACCESS_KEY_ID"):
            check_reachable(uploaded[1])
    finally:
        moto_s3.set_auth(False)
    check_reachable(uploaded[1])


def test_unreadable_credentials_fail_before_any_request(moto_s3, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
        check_reachable(moto_s3.uri())
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_PROFILE", "nightly")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n")
    with pytest.raises(ValueError, match="AWS_PROFILE='nightly' is not in"):
        check_reachable(moto_s3.uri())


def test_unreachable_endpoint_is_a_connection_error():
    options = StorageOptions(endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(ConnectionError, match="cannot reach the object store.*127.0.0.1:9"):
        check_reachable("s3://bucket/data", options)


def test_missing_object_is_not_retried(moto_s3):
    with pytest.raises(FileNotFoundError) as info:
        read_bytes(moto_s3.uri("storage/absent.png"))
    assert not storage.is_transient(info.value)
