"""The controller (``lrctl serve``): sessions, sockets, arbitration and persistence.

Never imports torch. :func:`serve` takes its sockets, state directory and sink
as arguments, and :class:`Server` its listeners, store, sink and :class:`Limits`,
so tests can run a private controller. Which module owns which job:

* :mod:`.process`: the process (lock, bind, detach, logging, signals);
* :mod:`.server`: the event loop, the registry of runs and the hot path;
* :mod:`.transport`, :mod:`.hello`, :mod:`.operator`, :mod:`.live_reload`,
  :mod:`.checkpoints`, :mod:`.guarded_sink`: one job each (see :mod:`.server`);
* :mod:`.session`, :mod:`.store`, :mod:`.liveness`: one run's state, its checkpoint
  files, the loop's heartbeat.
"""

from __future__ import annotations

from .limits import Limits
from .process import AlreadyServing, Listening, ServeOptions, bind, serve
from .server import Server

__all__ = ["AlreadyServing", "Limits", "Listening", "ServeOptions", "Server", "bind", "serve"]
