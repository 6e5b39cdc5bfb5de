"""Sockets for tests: free ports, waiting for a server, and an S3 endpoint that can vanish."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, seconds: float = 30.0) -> None:
    """Return once `url` answers; raise its last error after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


PROXY_CODE = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()

async def handle(client_reader, client_writer):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class TcpProxy:
    """The S3 endpoint the pipeline sees: a TCP forwarder to moto in its own process.

    Stopping it (SIGKILL) makes the endpoint vanish exactly as a crashed server does
    (connections reset, new ones refused) while moto's store, behind it, survives, as a real
    S3 / MinIO keeps its data across a restart. Started again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target_port = free_port(), target_port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        deadline = time.monotonic() + 20
        while True:  # the port may linger a moment after a kill
            self.process = subprocess.Popen(
                [sys.executable, "-c", PROXY_CODE, str(self.port), str(self.target_port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            if self.process.stdout.readline().strip() == b"ready":
                return
            self.process.wait()
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy could not listen again")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
