"""The I/O floor arm of ``lrctl bench overhead``: a process that echoes frames."""

from __future__ import annotations

__all__ = ["Echo"]


_ECHO = ("import socket, sys\n"
         "s = socket.socket(fileno=int(sys.argv[1]))\n"
         "try:\n"
         "    while data := s.recv(65536):\n"
         "        s.sendall(data)\n"
         "except OSError:\n"  # the bench closed its end: done
         "    pass\n")


class Echo:
    """The I/O floor of any out-of-process controller: another process that echoes frames.

    The arm built on it does what the hook's I/O does each step (send one
    observation frame, poll, read what came back) and nothing else.
    """

    def __init__(self) -> None:
        import socket
        import subprocess
        import sys

        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock.setblocking(False)
        import select

        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def call(self, loss: float, g: float) -> None:
        from ..wire.messages import encode_obs

        self.sock.send(encode_obs(0, loss, g))
        if self.poller.poll(0):
            self.sock.recv(1 << 16)

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(10)
