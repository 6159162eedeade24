"""A TCP proxy on 127.0.0.1 that gives each connection a link like one to object storage: a first-byte
latency per response and a bandwidth cap per connection (what one S3 GET stream gets), so that reads one
at a time and reads in flight together can be compared on one machine.
"""

from __future__ import annotations

import socket
import threading
import time

#: a pause longer than this between two chunks from the server starts a new response on the connection
RESPONSE_GAP_S = 0.05


def shut_down(*sockets: socket.socket) -> None:
    """End both directions of each socket (the other pipe thread of the pair then sees the end too)."""
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class SlowLink:
    """Forward ``127.0.0.1:<port>`` to ``target``; server-to-client bytes go at ``rate`` bytes/s a
    connection, after ``latency`` seconds at the start of each response."""

    def __init__(self, target: tuple[str, int], rate: float, latency: float):
        self.target, self.rate, self.latency = target, rate, latency
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="slowlink-accept").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, shaped: bool) -> None:
        start, sent, last = 0.0, 0, float("-inf")
        try:
            while data := src.recv(65536):
                if shaped:
                    if time.perf_counter() - last > RESPONSE_GAP_S:  # a new response: its latency, a new budget
                        time.sleep(self.latency)
                        start, sent = time.perf_counter(), 0
                    sent += len(data)
                    early = sent / self.rate - (time.perf_counter() - start)
                    if early > 0:
                        time.sleep(early)
                dst.sendall(data)
                last = time.perf_counter()
        except OSError:
            pass
        finally:
            shut_down(src, dst)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._open:
                s.close()
