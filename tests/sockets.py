"""A socket factory for the delivery client that records every socket it makes.

Passed as ``build_http_client(..., sockets=Sockets())``: it is called (behind the
egress guard) with the address of each new connection, refuses, failing the
test, anything but 127.0.0.1, and keeps the sockets, so that tests can count the
connections opened and see whether each one has been closed.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any


class Sockets:
    def __init__(self) -> None:
        self.made: list[tuple[socket.socket, int]] = []
        self.connects: list[tuple[str, int]] = []

    def __call__(self, addr_info: tuple[int, int, int, str, tuple[Any, ...]]) -> socket.socket:
        family, type_, proto, _, address = addr_info
        host, port = address[0], address[1]
        self.connects.append((host, port))
        if not str(host).startswith("127."):
            raise AssertionError(f"test tried to connect to {host}")
        sock = socket.socket(family=family, type=type_, proto=proto)
        self.made.append((sock, port))
        return sock

    def open_to(self, port: int) -> int:
        """Sockets to ``port`` made and not closed yet."""
        return sum(1 for sock, to in self.made if to == port and sock.fileno() != -1)

    @property
    def closed(self) -> list[bool]:
        """Whether each socket made so far, in order, has been closed."""
        return [sock.fileno() == -1 for sock, _ in self.made]


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait on the running loop until ``check()`` holds, failing after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.02)
