"""A TCP proxy on 127.0.0.1 that can go dark: refuse new connections and cut open ones for a while.

Used to make a real S3-protocol endpoint unreachable mid-job without touching the clients.
"""

from __future__ import annotations

import socket
import threading
import time

from benchmarks.slowlink import shut_down


class FlakyProxy:
    """Forward 127.0.0.1:<port> to ``target``; :meth:`outage` refuses and resets for ``seconds``."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = False
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(128)
        s.settimeout(0.2)
        return s

    def _accept_loop(self) -> None:
        while not self._stopped:
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shut_down(src, dst)

    def outage(self, seconds: float) -> None:
        """Close the port (new connections are refused), reset open connections, reopen after ``seconds``."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        listener.close()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()
            except OSError:
                pass
        time.sleep(seconds)
        with self._lock:
            self._listener = self._listen(self.port)

    def close(self) -> None:
        self._stopped = True
        with self._lock:
            if self._listener is not None:
                self._listener.close()
            for c in self._conns:
                c.close()
