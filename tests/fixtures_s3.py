"""A real S3 server for the test session: moto's standalone server on 127.0.0.1, one bucket.

The server runs as a subprocess (the same HTTP path pyarrow, s3fs and Ray workers use against MinIO),
listens on a free loopback port, and is stopped by PID when the session ends. The AWS_* variables are
set for the whole session so that every client (and every Ray worker started afterwards) finds it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_BUCKET = "dinomaly-test"
_STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(process: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll the moto API until it answers; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)  # polling interval, bounded by the deadline
    raise TimeoutError(f"moto_server at {url} not ready after {timeout_s} s")


@dataclass
class MotoS3:
    """A running moto S3 server: `endpoint_url`, one `bucket`, and helpers to fill it."""

    endpoint_url: str
    bucket: str
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def upload(self, local_dir: str | os.PathLike, prefix: str) -> str:
        """Upload every file under `local_dir` to s3://bucket/prefix/...; returns that URI."""
        client = self.client()
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
        return self.uri(prefix)

    def set_auth(self, enforce: bool) -> None:
        """Make moto check credentials (True: unknown keys get 403 InvalidAccessKeyId) or accept any."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset-auth",
                                         data=b"0" if enforce else b"inf", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=5.0):
            pass


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """Session-scoped moto S3 server with bucket `dinomaly-test`; AWS_* env set for the session."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto_server.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    try:
        _wait_ready(process, endpoint, _STARTUP_TIMEOUT_S)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            os.environ.pop(key, None)
        server = MotoS3(endpoint_url=endpoint, bucket=MOTO_BUCKET)
        server.client().create_bucket(Bucket=MOTO_BUCKET)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
