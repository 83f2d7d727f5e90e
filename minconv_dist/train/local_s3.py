"""A throw-away S3 endpoint (moto) on 127.0.0.1, for tests and benchmarks: in a process of its own, stopped by
its PID. Not moto's in-process `ThreadedMotoServer`: the zarrs reader opens the decoder of a partly read chunk
(one HEAD request) before it releases the GIL, and a server in the same interpreter cannot answer it then."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from minconv_dist.train.local_ray import free_port


@contextmanager
def local_s3(buckets: Sequence[str] = (), start_timeout: float = 120.0) -> Iterator[dict[str, Any]]:
    """storage_options for a moto S3 server started here with `buckets` created; stopped on exit. Needs the test
    extra (moto[server])."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start on {endpoint} (exit code {server.poll()})") from None
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
