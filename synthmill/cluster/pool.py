"""The actor pool: hands shard ids to actors and owns retries (STYLE lesson 5).

The driver sends only shard ids. Each live actor has at most ``inflight`` shards queued, so a
slow actor never hoards work and a dead one loses little. An actor counts as live once its
``ready()`` call returns (its model is loaded); work goes only to live actors. When a task raises,
its shard's attempt count goes up and the shard goes back to the queue, up to ``max_attempts``.
When an actor dies, every shard it held is requeued the same way and a replacement is started
(within ``max_replacements``). A shard that used up its attempts is reported as failed with its
last error; the other shards still run.

The shards may also arrive while the pool runs (``feed``: an evaluation that scores a generate job's shards
as they are committed): the actors start at once and wait for work, and the pool ends when the feed says no
more will come and every shard has ended. Such a pool can ``give_way`` to the pool that makes its shards: while
that pool has an actor starting (``starting``: say, the replacement of a generator that died, waiting for the
place this pool's actors hold), this pool hands out no work and stops its actors as each becomes idle, and it
starts them again once the other pool's actors are all up.

Each failure is one line on the terminal (what failed, on which actor, the error's type and the first line
of its message); its whole text, the remote traceback, goes to a file of its own under ``OUTPUT/logs/``
(:class:`FailureLog`). The actors raise only in tasks, never in ``__init__`` (they keep a start error for
``ready()``): Ray prints the traceback of an error raised in an actor's creation task on the actor's
stderr, which reaches the terminal as dozens of lines, while a task's error reaches only the caller.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from synthmill.sharding import storage
from synthmill.sharding.layout import LOGS, OutputLayout

log = logging.getLogger(__name__)


class ProgressBar:
    """tqdm bar over samples (images, images/s, ETA): it counts the samples of committed units only, so it never
    shows work done that a failure then lost; the actors' own counts of samples made (committed or not, polled by
    the pool) follow it as ``made=N``."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1, desc=desc)
        self.in_committed = 0  # samples in the units committed so far: what the bar shows
        self.made = 0

    def update(self, n: int) -> None:
        """The actors have made ``n`` samples so far (a retried unit's samples count again)."""
        if n > self.made:
            self.made = n
            self.bar.set_postfix_str(f"made={n}", refresh=False)

    def committed(self, count: int) -> None:
        """A unit of ``count`` samples was committed."""
        self.in_committed += count
        self.bar.update(min(count, self.bar.total - self.bar.n))

    def close(self) -> None:
        self.bar.close()


@dataclass
class _Slot:
    handle: Any
    ready_ref: Any
    live: bool = False
    dead: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    inflight: dict[Any, int] = field(default_factory=dict)  # task ref -> shard id
    done: int = 0  # samples this actor reported finished (its ``progress()``), kept after it dies
    progress_ref: Any = None  # the outstanding ``progress()`` call


@dataclass
class PoolReport:
    """What happened: failed shards with their last error, attempts, actors started and lost."""

    failed: dict[int, str] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)
    actors_started: int = 0
    actors_lost: int = 0
    actor_infos: list[dict[str, Any]] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    """One line for a remote error: its type and the first line of its message."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}".splitlines()[0][:500].rstrip()
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500].rstrip()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _full_text(exc: BaseException) -> str:
    """All that is known of ``exc``: a Ray error's text holds the remote traceback (Ray's colours taken off)."""
    if isinstance(exc, (RayTaskError, RayActorError)):
        return _ANSI.sub("", str(exc)).rstrip() + "\n"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


#: Where a Ray error's text says the actor ran: "ray::A.f() (pid=1, ip=10.0.0.1, ..." (a task's error), or lines
#: "pid: 1" and "ip: 10.0.0.1" (an actor that died).
_RAY_WHERE = re.compile(r"\(pid=(\d+), ip=([^,\s)]+)|^\s*pid: (\d+)$(?:\n.*)*?^\s*ip: (\S+)$", re.M)


def _where(slot: _Slot, exc: BaseException | None = None) -> str:
    """Which actor: its host and process id (from its ``ready()`` info, else from the remote error), else Ray's id."""
    host, pid = slot.info.get("host"), slot.info.get("pid")
    if not (host and pid) and exc is not None and (found := _RAY_WHERE.search(str(exc))):
        pid, host = found.group(1) or found.group(3), found.group(2) or found.group(4)
    if host and pid:
        return f"{host} pid {pid}"
    try:
        return f"id {slot.handle._actor_id.hex()[:16]}"
    except Exception:  # noqa: BLE001 - a handle without Ray's private attribute (a stand-in): no name
        return "?"


class FailureLog:
    """The full text of each failure of the actors, one file per failure under ``OUTPUT/logs/``.

    A file per failure, written whole: the lines on the terminal name each file as it is made, and an object
    store (S3) has no appending. The files are named by the run's start time (UTC) and what failed, e.g.
    ``logs/20261203T131404Z-shard-000003-attempt-1.log``, so reruns add files and replace none. They are
    written on a thread, with a short retry budget: a storage outage does not hold up the pool. A file that
    cannot be written is one warning line; the job goes on. Nothing reads them: they are not units of work, and
    may be deleted at any time. Secrets are taken out as from every line printed (``storage.redact_text``).
    """

    RETRY_S = 10.0

    def __init__(self, layout: OutputLayout | None):
        self.layout = layout
        self.stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._writer: ThreadPoolExecutor | None = None

    def write(self, what: str, where: str, exc: BaseException, name: str = "") -> str:
        """Save the whole of ``exc`` as the log of ``what`` (``shard 000003 attempt 1``) on the actor ``where``, in
        the file ``name`` (``what`` by default; made safe for a file name); return " (full traceback: URL)" for the
        terminal line, or "" without an output to write to."""
        if self.layout is None:
            return ""
        url = self.layout.file(LOGS, f"{self.stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name or what)}.log")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        text = f"{what}: failed on actor {where} (seen by the driver at {when})\n\n{_full_text(exc)}"
        data = storage.redact_text(text).encode("utf-8", "replace")
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="failure-log")
        self._writer.submit(self._save, url, data)
        return f" (full traceback: {storage.redact_url(url)})"

    def _save(self, url: str, data: bytes) -> None:
        try:
            with storage.retry_budget(self.RETRY_S):
                storage.write_bytes(url, data, self.layout.opts if self.layout else None)
        except Exception as e:  # noqa: BLE001 - a log of a failure must not fail the job
            log.warning("could not save %s: %s: %s", storage.redact_url(url), type(e).__name__,
                        str(e).strip().splitlines()[0] if str(e).strip() else "")

    def close(self, wait: bool = True) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=wait, cancel_futures=not wait)
            self._writer = None


class ShardPool:
    """Run ``method(shard_id, attempt)`` on actors made by ``make_actor()`` until every shard ends.

    ``logs``: the output whose ``logs/`` folder gets each failure's full text (:class:`FailureLog`); ``unit``
    names a shard id in lines and log names (``shard 000003`` by default); ``task_args(k)``: more arguments of
    shard ``k``'s calls, after its id and attempt; ``starting``: set while an actor of this pool is starting
    (placed or not, loading its model), clear otherwise (what a pool that ``give_way`` to this one reads).
    """

    def __init__(
        self,
        make_actor: Callable[[], Any],
        num_actors: int,
        *,
        method: str = "process_shard",
        inflight: int = 2,
        max_attempts: int = 3,
        max_replacements: int | None = None,
        start_timeout_s: float = 1800.0,
        tick_s: float = 0.5,
        logs: OutputLayout | None = None,
        unit: Callable[[int], str] | None = None,
        task_args: Callable[[int], tuple] | None = None,
        starting: threading.Event | None = None,
    ):
        self.make_actor, self.num_actors, self.method = make_actor, num_actors, method
        self.task_args = task_args or (lambda k: ())  # what each call gets after (shard id, attempt)
        self.logs, self.unit = logs, unit or (lambda k: f"shard {k:06d}")
        self.inflight, self.max_attempts, self.tick_s = inflight, max_attempts, tick_s
        self.start_timeout_s = start_timeout_s
        self.max_replacements = 2 * num_actors + 2 if max_replacements is None else max_replacements
        self.starting = starting

    def _start(self) -> _Slot:
        handle = self.make_actor()
        return _Slot(handle, handle.ready.remote())

    def run(
        self,
        shard_ids: list[int],
        on_result: Callable[[int, Any], None],
        on_progress: Callable[[int], None] | None = None,
        feed: Callable[[], tuple[list[int], bool]] | None = None,
        give_way: Callable[[], bool] | None = None,
    ) -> PoolReport:
        """Process ``shard_ids``; ``on_result(k, result)`` is called once per successful shard.

        With ``on_progress``, the actors' ``progress()`` (samples finished so far) is polled about once a
        second without waiting on it, and ``on_progress(sum)`` is called every tick.

        With ``feed``, shards also come while the pool runs: every tick ``feed()`` gives (the shard ids ready
        since, whether more may come). ``num_actors`` actors start at once; while more may come, an actor
        still waiting for a place (the cluster busy with what makes the shards) is not given up on. With
        ``give_way`` too, while ``give_way()`` is true no shard is handed out and each actor with none in flight is
        stopped (its place freed, not counted as lost); as many start again once it is false.
        """
        report = PoolReport()
        queue: deque[int] = deque(shard_ids)
        self.more = feed is not None
        self.failure_log = FailureLog(self.logs)
        slots = [self._start() for _ in range(self.num_actors if self.more else min(self.num_actors, len(shard_ids)))]
        report.actors_started = len(slots)
        replacements = 0

        def retire(slot: _Slot, reason: str, replace: bool = True, where: str = "", saved: str = "") -> None:
            nonlocal replacements
            if slot.dead:
                return
            slot.dead = True
            report.actors_lost += 1
            for _ref, k in list(slot.inflight.items()):
                self._attempt_failed(k, f"actor lost: {reason}", queue, report, where, saved)
            slot.inflight.clear()
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:  # already gone
                pass
            if replace and (queue or self.more) and replacements < self.max_replacements:
                replacements += 1
                report.actors_started += 1
                slots.append(self._start())
                log.warning("actor lost (%s); started a replacement", reason)

        ended = False
        try:
            self._loop(slots, queue, report, retire, on_result, on_progress, feed, give_way)
            ended = True
        finally:  # also when on_result or feed raises: never leave actors running
            for s in slots:
                if not s.dead:
                    ray.kill(s.handle, no_restart=True)
            if self.starting is not None:
                self.starting.clear()
            self.failure_log.close(wait=ended)  # the logs named on the terminal are there when the pool returns
        return report

    def _give_way(self, slots: list[_Slot], queue: deque, give_way: Callable[[], bool] | None,
                  stopped: int) -> tuple[int, bool]:
        """While ``give_way()`` (and more shards may come): stop each actor with no shard in flight. Once it is false,
        start as many again as were stopped, if there is work left. Returns (actors stopped and not started again,
        whether to hand out no shards now)."""
        if give_way is None or (not self.more and not stopped):
            return stopped, False
        if self.more and give_way():
            for s in slots:
                if not s.dead and not s.inflight:
                    s.dead = True
                    stopped += 1
                    log.info("an idle actor stopped: its place goes to an actor starting to make the work")
                    try:
                        ray.kill(s.handle, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
            return stopped, True
        if queue or self.more:
            for _ in range(stopped):
                slots.append(self._start())
        return 0, False

    def _loop(self, slots, queue, report, retire, on_result, on_progress, feed, give_way) -> None:
        last_poll = 0.0
        last_start_error = ""
        ever_live = False
        idle_since = time.monotonic()  # since when no actor has been live (for start_timeout_s)
        stopped = 0  # actors stopped to give way, to start again
        while True:
            if self.more:
                ready_ids, self.more = feed()
                queue.extend(ready_ids)
            stopped, giving = self._give_way(slots, queue, give_way, stopped)
            live = [s for s in slots if not s.dead]
            if self.starting is not None:
                if any(not s.live for s in live):
                    self.starting.set()
                else:
                    self.starting.clear()
            if stopped and not any(s.inflight for s in live):  # given way: nothing runs until they start again
                time.sleep(self.tick_s)
                continue
            for s in live if not giving else ():
                while s.live and queue and len(s.inflight) < self.inflight:
                    k = queue.popleft()
                    report.attempts[k] += 1
                    call = getattr(s.handle, self.method).remote(k, report.attempts[k], *self.task_args(k))
                    s.inflight[call] = k
            waiting = {ref: s for s in live for ref in s.inflight}
            starting = {s.ready_ref: s for s in live if not s.live}
            if not queue and not waiting and not self.more:
                break  # all shards ended; actors still starting (say, unplaceable replacements) are not needed
            if any(s.live for s in live) or self.more:  # while shards are being made, their makers hold the cluster
                idle_since = time.monotonic()
            elif starting and time.monotonic() - idle_since > self.start_timeout_s:
                last_start_error = (f"no actor became ready within {self.start_timeout_s:.0f}s "
                                    "(not enough free resources in the cluster?)")
                for s in starting.values():
                    retire(s, last_start_error, replace=False)
                continue
            if not waiting and not starting and any(s.live for s in live):  # idle: the next shards are not ready
                time.sleep(self.tick_s)
                continue
            if not waiting and not starting:  # nothing can run the rest
                reason = (f"actor failed to start: {last_start_error}" if last_start_error
                          else "no actor could be started")
                for k in queue:
                    report.failed[k] = f"not run: {reason}"
                break
            ready, _ = ray.wait(list(waiting) + list(starting), num_returns=1, timeout=self.tick_s)
            if on_progress is not None:
                last_poll = self._poll_progress(slots, last_poll)
                on_progress(sum(s.done for s in slots))
            for ref in ready:
                if ref in starting:
                    slot = starting[ref]
                    try:
                        slot.info = dict(ray.get(ref), ready_at=time.time())  # when the driver saw it ready
                        slot.live = ever_live = True
                        report.actor_infos.append(slot.info)
                    except Exception as e:  # the actor's start raised (its ready(), or __init__), or its process died
                        last_start_error = _short(e)
                        raised = isinstance(e, RayTaskError) or bool(getattr(e, "actor_init_failed", False))
                        where = _where(slot, e)
                        saved = self.failure_log.write("actor start", where, e, f"actor {where} start")
                        log.error("actor failed to start (%s) on %s: %s%s", "raised" if raised else "died", where,
                                  last_start_error, saved)
                        # A process that died (killed, node lost) is replaced. One whose __init__ raised
                        # (a model that cannot load) is replaced only if some actor has worked, so a
                        # broken model fails the job once instead of being loaded again and again.
                        retire(slot, last_start_error, replace=ever_live or not raised)
                    continue
                slot = waiting[ref]
                k = slot.inflight.pop(ref, None)
                if k is None:
                    continue
                try:
                    result = ray.get(ref)
                except RayActorError as e:
                    # back in the queue first: retire() starts a replacement only while shards are waiting,
                    # and this one may be the last (its actor the only one left)
                    where = _where(slot, e)
                    saved = self.failure_log.write("actor process lost", where, e, f"actor {where} lost")  # all it held
                    self._attempt_failed(k, f"actor lost: {_short(e)}", queue, report, where, saved)
                    retire(slot, _short(e), where=where, saved=saved)
                    continue
                except Exception as e:  # the task raised: count it against the shard
                    where = _where(slot, e)
                    saved = self.failure_log.write(f"{self.unit(k)} attempt {report.attempts[k]}", where, e)
                    self._attempt_failed(k, _short(e), queue, report, where, saved)
                    continue
                on_result(k, result)

    @staticmethod
    def _poll_progress(slots: list[_Slot], last_poll: float) -> float:
        """Once a second: take the ``progress()`` answers that have arrived and ask the live actors again.

        Nothing here waits on an actor. An actor's count stays in the sum after it dies, as the samples it
        made may already be committed.
        """
        now = time.monotonic()
        if now - last_poll < 1.0:
            return last_poll
        asked = [s for s in slots if s.progress_ref is not None]
        if asked:
            ready = set(ray.wait([s.progress_ref for s in asked], num_returns=len(asked), timeout=0)[0])
            for s in asked:
                if s.progress_ref in ready:
                    try:
                        s.done = max(s.done, int(ray.get(s.progress_ref)))
                    except Exception:  # the actor died; the pool's own wait reports that
                        pass
                    s.progress_ref = None
        for s in slots:
            if s.live and not s.dead and s.progress_ref is None:
                s.progress_ref = s.handle.progress.remote()
        return now

    def _attempt_failed(self, k: int, error: str, queue: deque, report: PoolReport, where: str = "",
                        saved: str = "") -> None:
        """Shard ``k``'s attempt failed with ``error`` (one line) on the actor ``where``; ``saved`` names the file
        that holds the whole error. One line on the terminal, whatever the error's text."""
        on = f" on actor {where}" if where else ""
        if report.attempts[k] >= self.max_attempts:
            report.failed[k] = f"{error} (after {report.attempts[k]} attempts)"
            log.error("%s attempt %d failed%s: %s; failed for good after %d attempts%s", self.unit(k),
                      report.attempts[k], on, error, report.attempts[k], saved)
        else:
            log.warning("%s attempt %d failed%s: %s; retrying%s", self.unit(k), report.attempts[k], on, error, saved)
            queue.appendleft(k)
