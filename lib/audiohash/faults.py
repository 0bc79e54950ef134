"""Fault points: named places of a run where a test kills or pauses it, deterministically (no sleep
that a fast run could outrun, no race with a poll).

Off unless the environment sets ``AUDIOHASH_FAULT`` (one dictionary lookup per call), or an
in-process test registers a callback with ``at``. ``AUDIOHASH_FAULT="<point>:<action>[:<folder>]"``:
- ``exit``: the process that reaches ``<point>`` exits at once with status 137, as a SIGKILL
  would leave it: no cleanup, no ``finally``, no commit;
- ``pause``: the first process to reach ``<point>`` writes ``<folder>/paused`` (a JSON object:
  its pid, and Spark's stage id and task attempt id where it runs in a task) and waits until
  ``<folder>/release`` exists (at most ``PAUSE_LIMIT_S``); later arrivals pass. A test waits for
  the file, then does what it tests (kill the worker holding that pid) while the task is
  certainly mid-scan.
Executors get the variable from ``spark.executorEnv.AUDIOHASH_FAULT`` (local mode: inherited).

The points: ``encode.before_commit`` (driver: the code files are written, not yet committed);
``scan.task`` (a task of the encode or query scan, before it reads its rows).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable

ENV = "AUDIOHASH_FAULT"
PAUSE_LIMIT_S = 600.0
_callbacks: dict[str, Callable[[], None]] = {}


def point(name: str) -> None:
    """Mark fault point ``name``: does nothing unless a test asked for a fault here."""
    if name in _callbacks:
        _callbacks.pop(name)()  # once: a callback that runs the same code does not recurse
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    action, _, folder = rest.partition(":")
    if action == "exit":
        os._exit(137)
    if action == "pause":
        _pause(folder)


def _pause(folder: str) -> None:
    try:
        fd = os.open(os.path.join(folder, "paused"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another process paused first
    where = {"pid": os.getpid()}
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
        if context is not None:
            where.update(stage_id=context.stageId(), task_attempt_id=context.taskAttemptId())
    except ImportError:
        pass
    with os.fdopen(fd, "w") as out:
        json.dump(where, out)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    release = os.path.join(folder, "release")
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def at(name: str, callback: Callable[[], None]):
    """In-process tests: run ``callback`` the first time this process reaches point ``name``."""
    _callbacks[name] = callback
    try:
        yield
    finally:
        _callbacks.pop(name, None)
