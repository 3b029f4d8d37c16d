"""A TCP proxy in front of MariaDB that can play a database outage without stopping the server.

In a test's own process: ``TcpProxy(target).listen()`` gives the port to point a daemon at,
``cut()`` plays the outage and ``listen()`` ends it on the same port. As a process of its own
(the chaos run, where the test process's GIL must not sit between the daemons and their
database):

    python -m tests.support.tcp_proxy TARGET_HOST:PORT PORT_FILE

listens on an ephemeral port of 127.0.0.1 (written to PORT_FILE) and forwards every connection
to the target. ``SIGUSR1`` cuts it: the listening socket is closed (new connections are
refused, as by a stopped server) and every open connection is reset (clients see "lost
connection", as at a server restart). ``SIGUSR2`` listens again on the same port. ``SIGTERM``
ends it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

_CHUNK = 65536


class TcpProxy:
    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def listen(self) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self.port

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            _reset(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _reset(client)
                    _reset(upstream)
                    return
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a dying server's kernel would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    proxy = TcpProxy((host, int(port)))
    Path(sys.argv[2]).write_text(str(proxy.listen()))
    stop = threading.Event()
    requests: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        requests.append(signum)
        wake.set()

    for handled in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(handled, on_signal)
    while not stop.is_set():
        wake.wait(1.0)
        wake.clear()
        while requests:
            asked = requests.pop(0)
            if asked == signal.SIGUSR1:
                proxy.cut()
            elif asked == signal.SIGUSR2:
                proxy.listen()
            else:
                proxy.cut()
                stop.set()


if __name__ == "__main__":
    main()
