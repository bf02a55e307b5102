"""A TCP proxy on loopback that can make every connection through it go silent, as a Redis
primary does when its machine is lost without a word (no FIN, no RST): what a client sends is
swallowed and nothing ever comes back. Connections opened afterwards are forwarded again, as
they would reach the new primary after a failover.

Used by the fault suite to show that a worker's Redis clients give up on a silent connection
(``Settings.redis_socket_timeout_s``) instead of waiting forever. Threads only; every socket is
closed by ``close``.
"""

from __future__ import annotations

import select
import socket
import threading
from dataclasses import dataclass, field

from worker.demo.local import LOOPBACK

_POLL_S = 0.1


@dataclass
class _Link:
    """One client connection and its connection to the target."""

    client: socket.socket
    target: socket.socket
    silent: bool = False


@dataclass
class BlackholeProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port`` until ``silence()``."""

    target_port: int
    port: int = 0
    links: list[_Link] = field(default_factory=list)
    _closed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> BlackholeProxy:
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(_POLL_S)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="blackhole-accept", daemon=True).start()
        return self

    def url(self, redis_url: str) -> str:
        """``redis_url`` (of the target) pointed at the proxy instead."""
        return redis_url.replace(f":{self.target_port}/", f":{self.port}/")

    def silence(self) -> int:
        """Make every connection open now silent for good; return how many there were."""
        with self._lock:
            for link in self.links:
                link.silent = True
            return len(self.links)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for link in self.links:
                for sock in (link.client, link.target):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            target = socket.create_connection((LOOPBACK, self.target_port))
            link = _Link(client, target)
            with self._lock:
                self.links.append(link)
            threading.Thread(target=self._pump, args=(link,), name="blackhole-pump", daemon=True).start()

    def _pump(self, link: _Link) -> None:
        """Copy bytes both ways; once the link is silent, read and drop them."""
        peers = {link.client: link.target, link.target: link.client}
        while not self._closed.is_set():
            try:
                readable, _w, _x = select.select(list(peers), [], [], _POLL_S)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        if not link.silent:  # a silent peer never says goodbye either
                            peers[sock].close()
                        return
                    if not link.silent:
                        peers[sock].sendall(data)
            except (OSError, ValueError):
                return
