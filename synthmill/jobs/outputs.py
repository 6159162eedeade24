"""What every job kind does with its output folder: check it before starting, and record versions."""

from __future__ import annotations

import errno
import json
import os
import platform
from collections.abc import Callable
from typing import Any

from synthmill.errors import SpecError
from synthmill.sharding import storage
from synthmill.sharding.layout import JOB_YAML, PLAN, OutputLayout

#: Seconds a storage outage may last during validation before the input counts as unreachable.
VALIDATE_RETRY_S = 10.0


def _check_existing(url: str, fingerprint: str, opts: dict[str, Any] | None, names: list[str], kind: str = "") -> None:
    """An existing output folder must be empty or hold an earlier run of this same job."""
    previous = storage.read_plan(url, opts)
    if previous is None:
        # a run killed while it wrote its first file (plan.json) left only that file's temporary
        if [n for n in names if not storage.is_temporary(n.rstrip("/").rsplit("/", 1)[-1])]:
            raise SpecError(f"output.path {url}: folder is not empty and holds no synthmill job; "
                            "choose a new or empty folder")
    elif kind and previous.get("kind") not in (None, kind):
        theirs = str(previous.get("kind"))
        raise SpecError(f"output.path {url}: holds the output of {'an' if theirs[:1] in 'aeiou' else 'a'} {theirs} "
                        f"job, and this is {'an' if kind[:1] in 'aeiou' else 'a'} {kind} job; use a new output.path")
    elif previous.get("fingerprint") != fingerprint:
        raise SpecError(
            f"output.path {url}: holds a different job (fingerprint {previous.get('fingerprint')}, this one's "
            f"{fingerprint}: settings that shape its results differ from {storage.join(url, 'job.yaml')}); use "
            "a new output.path or the same spec"
        )
    else:  # this same job's, by its plan: which must be the plan of the settings in its job.yaml
        check_plan_matches_job(url, opts, previous)


def check_plan_matches_job(url: str, opts: dict[str, Any] | None, plan: dict[str, Any]) -> None:
    """The ``plan`` of the output at ``url`` must be that of the spec in its ``job.yaml``: SpecError naming both.

    Whoever trusts a plan.json's counts and fingerprint (``synthmill status``, a job reading a generate output,
    a rerun into the folder) checks them here against the settings they come from: the fingerprint recomputed
    from job.yaml (:func:`~synthmill.jobs.spec.spec_of_output`, which checks no input) and each kind's counts
    (the spec's ``plan_mismatch``). A folder without job.yaml (a run killed just after it wrote plan.json, or
    an output of the first versions) is not compared.
    """
    from synthmill.jobs.spec import spec_of_output

    plan_url, job_url = storage.join(url, PLAN), storage.join(url, JOB_YAML)
    try:
        data = storage.read_bytes(job_url, opts)
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"{job_url}: cannot be read ({e.strerror})") from None
    spec = spec_of_output(data, job_url)
    theirs = plan.get("kind") or "generate"
    problem = f"the plan of a {theirs} job, the spec of a {spec.kind} job" if spec.kind != theirs else \
        spec.plan_mismatch(plan)
    if problem:
        raise SpecError(f"{plan_url}: does not match {job_url} ({problem}); one of them was edited or replaced")


def claim_output(layout: OutputLayout, plan: dict[str, Any]) -> None:
    """Make the output folder this job's by writing its ``plan.json`` (kind and fingerprint in ``plan``).

    The first plan.json is created exclusively (:func:`~synthmill.sharding.storage.create_exclusive`), so of
    two jobs started into the same new folder at once exactly one gets it, whatever the timing: the checks
    of ``prepare`` (:func:`check_output_folder`) both passed before either wrote. Once there, a plan.json is
    only ever replaced by one with the same kind and fingerprint, so the folder stays that job's. The same
    job run again (a resume, a killed run's rerun, or two runs of it at once) finds its own plan and brings
    it up to date; any other job is a SpecError naming the folder and the job that holds it.
    """
    data = (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode()
    url, kind, fingerprint = layout.url, plan["kind"], plan["fingerprint"]
    for _ in range(3):  # the plan found can only vanish if someone deletes it
        if storage.create_exclusive(layout.file(PLAN), data, layout.opts):
            return
        holder = storage.read_plan(url, layout.opts)
        if holder is None:
            continue
        theirs = holder.get("kind") or "generate"  # outputs of the first versions name no kind
        # a generate job whose prompts grew holds the plan of its earlier rows: its fingerprint is among those
        grown = [p.get("fingerprint") for p in plan.get("grown_from") or () if isinstance(p, dict)]
        if theirs != kind or holder.get("fingerprint") not in (fingerprint, *grown):
            raise SpecError(
                f"output.path {url}: another {theirs} job (fingerprint {holder.get('fingerprint')}, its spec "
                f"{storage.join(url, JOB_YAML)}) took this folder while this {kind} job (fingerprint "
                f"{fingerprint}) started; one folder holds one job: use a new output.path or the same spec")
        layout.write_json(PLAN, plan)
        return
    raise SpecError(f"output.path {url}: its {PLAN} keeps vanishing as this job writes it; is something deleting "
                    "the folder?")


def set_plan_check(field: str, opts: dict[str, Any] | None) -> Callable[[str, dict[str, Any]], None]:
    """What :func:`~synthmill.sharding.images.open_image_set` calls with the plan of a generate output read as an
    image set: :func:`check_plan_matches_job`, its SpecError under ``field``."""
    def check(url: str, plan: dict[str, Any]) -> None:
        try:
            check_plan_matches_job(url, opts, plan)
        except SpecError as e:
            raise SpecError(f"{field}: {e}") from None

    return check


def check_output_folder(url: str, fingerprint: str, opts: dict[str, Any] | None, kind: str = "") -> None:
    """``output.path`` must be new, empty, or an earlier run of this same job (of this ``kind``), and writable."""
    if "memory://" in url:  # also chained: simplecache::memory://
        raise SpecError(f"output.path {url}: memory:// lives inside one process; actors could not share it "
                        "and it is gone when the job ends")
    if not storage.is_local(url):
        fs, path = storage.filesystem(url, opts)
        try:  # listing first: bad credentials surface here as PermissionError, not as "no bucket"
            names = storage.retrying(url, "list", lambda: fs.ls(path, refresh=True))
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            if not storage.retrying(url, "check", lambda: fs.exists(bucket)):
                raise SpecError(f"output.path {url}: bucket '{bucket}' does not exist") from None
            names = []
        if storage.retrying(url, "check", lambda: fs.isfile(path)):
            raise SpecError(f"output.path {url}: is a file, not a folder (prefix)")
        _check_existing(url, fingerprint, opts, names, kind)
        return
    path = os.path.abspath(storage.path_of(url))
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SpecError(f"output.path {url}: symbolic links on the way form a loop") from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpecError(f"output.path {url}: exists and is a file, not a folder")
    if os.path.isdir(path):
        _check_existing(path, fingerprint, opts, os.listdir(path), kind)
    long = [part for part in path.split(os.sep) if len(part.encode()) > 255]
    if long:
        raise SpecError(f"output.path {url}: a folder name of {len(long[0].encode())} bytes is longer than a file "
                        "system allows (255)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"output.path {url}: cannot be written ({parent} is not a writable folder)")


def write_job_yaml(spec: Any, layout: OutputLayout) -> None:
    """``OUTPUT/job.yaml``: the resolved spec, with its storage options' secrets and its URLs' passwords redacted."""
    from omegaconf import OmegaConf

    from synthmill.jobs.kinds import KINDS
    from synthmill.jobs.spec import expand_field

    resolved = OmegaConf.structured(spec)
    resolved.storage = storage.redact(spec.storage)
    for dotted in (f for pattern in KINDS[spec.kind].paths for f in expand_field(spec, pattern)):  # user:password@
        value = OmegaConf.select(resolved, dotted)
        if isinstance(value, str):
            OmegaConf.update(resolved, dotted, storage.redact_url(value))
    storage.write_bytes(layout.file(JOB_YAML), OmegaConf.to_yaml(resolved).encode(), layout.opts)


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages`` (and Python), for summaries and metrics."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
