"""Coverage-guided fuzzing of the pure frame decoder with atheris (optional).

``python tests/reliability/atheris_decoder.py -atheris_runs=200000`` feeds
libFuzzer's inputs to :class:`lrctl.protocol.FrameDecoder` in random chunks:
anything but a :class:`~lrctl.protocol.ProtocolError` (or a whole message that
is not a dict with a string type) is a bug. ``test_atheris.py`` runs it briefly
when atheris is installed.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from lrctl.protocol import MAX_FRAME, MAX_HELLO, FrameDecoder, ProtocolError


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    decoder = FrameDecoder(MAX_FRAME, first_limit=MAX_HELLO)
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
        try:
            messages = decoder.feed(chunk)
        except ProtocolError:
            return  # the connection would be closed: the stream ends here
        for msg in messages:
            assert isinstance(msg, dict) and isinstance(msg["t"], str) and msg["v"] == 1


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
