"""What travels between the hook, the CLI and the controller: the wire protocol (version 1).

One package, used by both sides (the controller, the hook's link and the operator
client): :mod:`.frames` (framing, limits, the incremental decoder),
:mod:`.messages` (the per-step messages with their hand-formatted fast paths beside
the JSON they equal, and field validation), :mod:`.floats` (the one convention for
non-finite numbers in JSON, shared with the journal and the policies' state) and
:mod:`.operator` (the operator client). Pure but for the operator client: frames
in, frames out, testable by round trip.

Framing
-------
Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON encoding one object (or, with the length's top bit set, a compact frame:
below). JSON is strict: no ``NaN``/``Infinity`` literals; a non-finite number
travels as the string ``"nan"``, ``"inf"`` or ``"-inf"``.
Frames are capped: :data:`MAX_HELLO` for a connection's first frame (it carries
the policy text), :data:`MAX_FRAME` for every later one. A receiver that gets an
oversized length, bad UTF-8, bad JSON or a non-object answers with an ``error``
frame and closes the connection. Every JSON frame carries ``"v": 1``; a frame of an
unknown version is refused with an ``error`` frame naming both versions.

Compact frames (:mod:`.compact`): a frame whose length has its top bit set is the
binary form of a plain ``obs`` (or one with ``every="auto"``'s held steps) or ``lr``,
sent only between peers whose hello and welcome both said ``"compact": 1``; it decodes
to exactly the message its JSON frame gives.

Messages (field ``t`` is the type)
----------------------------------
Hook → controller:

* ``auth``: ``token`` (TCP only, the connection's first frame: see below).
* ``hello``: ``run`` (run key), ``run_name``, ``policy`` ``{text, source}``,
  ``lrs`` (initial LR per param group), ``groups``, ``world_size``, ``mlflow``
  ``{run_id, tracking_uri}``, ``cwd``, ``watch`` (optional, default true:
  ``false`` pins the run to the policy version it starts with), ``total_steps``
  (optional: the run's length, for ``anneal``), ``snapshots`` (optional,
  ``{every, keep}``: the hook keeps snapshots and can roll back), ``session`` (optional: the
  run's state from ``snapshot``, kept in the user's checkpoint: the run resumes
  from it, unless it was last resumed from it already), ``session_id`` (the hook's name
  for that state, the same on its reconnects), ``resume_token`` (optional: the run's
  token from its welcome; a hello for a run that another live connection serves is
  refused without it), ``token`` (TCP,
  when no ``auth`` came first), ``compact`` (optional, 1: it reads compact frames),
  ``ran`` (optional, true: it reports each step after its optimizer step: see ``a``).
* ``obs``: ``s`` step, ``l`` loss, ``g`` grad norm (each may be absent or null),
  ``m`` named metrics (optional object), ``o`` (optional, true: a mixed-precision
  overflow step that the ``GradScaler`` skipped; never divergence), ``b``
  (optional: the loop's own LR per group for this step, ``base="loop"``), ``r``
  (optional: the snapshot step the hook restored before this step, a rollback
  carried out; journaled as a ``rolled_back`` decision), ``pl`` (optional, at most
  ``MAX_HELD`` (64) numbers: the losses of the steps ``s - len(pl)`` … ``s - 1`` that
  ``every="auto"`` held back; the controller observes each, in order, before ``s``,
  with the LRs in effect before the frame as the LRs they used unless ``pu`` says) and
  ``pg`` (their grad norms, the same length, null where none), ``pu`` (optional: the LRs
  those steps ran on, as runs ``[count, lrs]``, oldest first), ``u`` (optional: the LRs
  the optimizer step of ``s`` runs on, as the hook settled them; the controller records
  these, not its own view of what was in effect), ``gu`` (optional, ``every=N``: where
  the LRs changed in the unreported steps since the last observed one, as at most
  ``MAX_PRIOR`` ``[step, lrs]`` pairs, steps in order; the controller records each change
  at its step; under ``base="loop"`` the LRs those steps ran on, the loop's schedule
  included, where ``u`` is in lrctl's terms and scaled by ``b``), ``e`` (optional, 1:
  the run's end: metrics reported after its last step, on a step ``s`` that never runs;
  the policies see them, the record gets no LRs or statistics for that step), ``a``
  (optional, 1: the hook reports each step after its optimizer step, ``ctl.step()``
  after ``optimizer.step()``: no skip can reach its steps, and their records say so;
  said once a connection, in the first report after the hook learnt it, or as ``ran``
  in its hello when it knew it then).
* ``late``: ``steps``, at most ``MAX_PRIOR`` ``[step, lrs]`` pairs, steps in order: a
  sync hook's reported steps that ran without their answer (its wait for it ran out, or
  it did not wait while the answers were late), each with the LRs it ran on, sent before
  its next report (or its ``bye``), only to a controller whose welcome says ``late``. The
  controller logs the last observed step's LR points again as it ran, and records what
  of its answer did not reach it (``not_applied``). No answer.
* ``snapshot``: the run's state after every observation so far → ``snapshot``
  ``{s, session}``.
* ``bye``: the run ended; the controller closes the session.

Controller → hook:

* ``welcome``: ``run``, ``last_step`` (-1 before any observation), ``saved_step``,
  ``lrs``, ``mode``, ``restored``, ``policy_sha256``, ``resume_token``, ``compact``
  (1: it reads compact frames, and may send them), ``used`` (1: it records the LRs a
  report says its step ran on), ``late`` (1: it reads ``late``). The hook
  replays the observations it holds with a step greater than ``last_step``.
* ``lr``: ``s`` (the observation step it answers, or -1 for a push from an
  operator or a live policy reload), ``lrs`` for the next step, ``skip``, ``stop``, ``mode``,
  ``saved_step`` (the last step checkpointed to disk), ``d`` (new decisions,
  each a ``Decision.to_dict()``).

Operator → controller (one request, one answer, on its own connection; over
TCP each request carries ``token``):

* ``runs`` → ``runs`` ``{runs: [{run, run_name, step, lrs, mode, connected,
  override, last_decision, policy_source, policy_sha256, watching, reloads,
  reload_error, store_error}]}``
* ``set_lr`` ``{run, lr, steps, force}`` (``steps`` null: until cleared; ``force`` true:
  an LR more than 100x both the initial and the current one is taken), ``clear_lr``
  ``{run}``, ``pause`` ``{run}``, ``resume`` ``{run}`` → ``ok`` ``{message}``
* ``rollback`` ``{run, to}`` (``to`` absent: the newest snapshot) → ``ok`` ``{message}``
* ``reload`` ``{run}`` (``run`` absent: every watched run) → ``ok``
  ``{message, decisions}``; a pinned run answers ``error`` ``pinned``
* ``status`` → ``status`` ``{pid, version, runs, connected, uptime_s, socket,
  state_dir, watching, errors}``

Either side: ``error`` ``{code, message, fatal, retry}``. ``fatal`` means the sender
closes the connection after it; ``retry`` (with ``fatal``, code ``unavailable``) that
the refusal is temporary: try again later.

Over TCP a peer's first frame may be at most 4 KiB and must carry the token (an
``auth`` frame, or any small request with ``token``): the controller decodes nothing
after it until the token checks out.
"""
