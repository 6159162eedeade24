"""Storage behind string URIs: local paths and ``s3://`` (any fsspec URL) through one small API.

Commit semantics (docs/design.md invariant 3): :func:`put_file` and :func:`write_bytes` make an object
visible only when it is complete: locally by writing a temporary sibling and renaming it over the
target (atomic on POSIX), on object stores by a single completed upload.

Every remote call goes through :func:`retrying`: transient errors (connection refused or reset,
timeouts, 5xx, throttling) are retried with exponential backoff for up to ``RETRY_SECONDS``; a
permanent one (no such bucket or key, access denied) is raised at once. Errors name the URL, never
the credentials: storage options are passed to fsspec and never formatted into messages.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from synthmill.errors import disk_full

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a transient storage outage is ridden out before the operation fails.
RETRY_SECONDS = float(os.environ.get("SYNTHMILL_STORAGE_RETRY_SECONDS", "120"))

_budget: ContextVar[float | None] = ContextVar("storage_retry_budget", default=None)


@contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Within the block, give up on a transient error after ``seconds`` (validation wants a quick answer), or
    after ``RETRY_SECONDS`` if that is shorter (a user who set it lower wants no longer waits anywhere)."""
    token = _budget.set(min(seconds, RETRY_SECONDS))
    try:
        yield
    finally:
        _budget.reset(token)


#: Storage option keys whose values are secrets: never written to job.yaml, logs or messages. A key that
#: holds one of these words hides its whole value, a mapping or list included (``headers: {Authorization:
#: ...}``, Azure's ``connection_string``, ``sas_token``, ``client_kwargs.auth``, an sftp ``passphrase``).
SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "passwd", "pwd", "passphrase", "credential", "creds",
                       "session", "auth", "bearer", "cookie", "sas", "connection_string", "private")

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              ValueError, TypeError, KeyError)
_TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "RequestTimeTooSkewed", "503", "500", "502", "504")


class StorageError(OSError):
    """A storage operation failed for good; the message names the URL."""


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in url or url.startswith("file://")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it (options apply to remote URLs only).

    A URL no filesystem serves (an unknown protocol, one whose package is not installed, a chained URL
    whose archive cannot be opened) raises :class:`StorageError` naming it.
    """
    try:
        return url_to_fs(url, **({} if is_local(url) else dict(storage_options or {})))
    except ImportError as e:  # fsspec knows the protocol; its package is missing
        raise StorageError(f"{url}: {e}") from None
    except ValueError as e:
        if "Protocol not known" in str(e):
            protocol = url.split("://", 1)[0]
            raise StorageError(f"{url}: no storage for '{protocol}://' URLs (local paths, file://, s3://, "
                               "and other fsspec protocols whose package is installed)") from None
        raise
    except OSError as e:
        raise StorageError(f"{url}: cannot be opened ({type(e).__name__}: {e})") from None


#: What a secret is replaced by in job.yaml and messages.
REDACTED = "<redacted>"


def redact(options: Any) -> Any:
    """Storage options with secret values replaced, for job.yaml and messages.

    Mappings and lists are walked; the value of a key naming a secret (:data:`SECRET_OPTION_WORDS`) is
    replaced whole; a string that is a URL loses the password of its ``user:password@``.
    """
    if isinstance(options, dict):
        return {k: REDACTED if v is not None and any(w in str(k).lower() for w in SECRET_OPTION_WORDS)
                else redact(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    if isinstance(options, str):
        return redact_url(options)
    return options


def redact_url(url: str) -> str:
    """``url`` without its secrets, for job.yaml and messages.

    The password of a ``scheme://user:password@host`` part goes, and so does the value of each query
    parameter that names a secret: a presigned S3 or GCS URL's ``X-Amz-Signature`` / ``X-Amz-Credential`` /
    ``X-Amz-Security-Token`` / ``X-Goog-Signature``, an Azure SAS ``sig``, an API ``key`` or ``token``.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:<redacted>@{host}"
    if question:
        query = "&".join(_redact_parameter(p) for p in query.split("&"))
    return f"{scheme}://{authority}{slash}{path}{question}{query}"


#: Secret values this process was given (storage options, URL passwords, credentials in the environment): a log
#: line or message that quotes one anywhere, in any form (botocore's ``Invalid bucket name "user:PASSWORD@b"``),
#: shows ``<redacted>`` instead. Filled by :func:`remember_secrets`.
_SECRETS: set[str] = set()
#: Environment variables holding credentials that the clients synthmill drives (boto, huggingface_hub) read.
SECRET_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                      "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
                      "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_KEY", "GOOGLE_OAUTH_ACCESS_TOKEN")
#: Shorter values are not searched for: they would match ordinary words and numbers.
_MIN_SECRET = 4
_URL_IN_TEXT = re.compile(r"\w[\w+.-]*://[^\s'\"<>]+")
#: Secrets in the forms HTTP clients log them at debug level: headers of a request (``'X-Amz-Security-Token':
#: b'...'``, ``x-amz-security-token:...`` in a canonical request), a SigV4 ``Authorization``'s ``Credential=`` and
#: ``Signature=``, and a presigned URL's parameters.
_SECRET_FIELDS = re.compile(
    r"(?i)\b((?:x-amz-security-token|x-amz-signature|x-amz-credential|x-goog-signature|x-goog-credential|"
    r"x-ms-copy-source-authorization|authorization|cookie|set-cookie|credential|signature|token|"
    r"api[-_]?key|access[-_]?key[-_]?id|secret[-_]?access[-_]?key|session[-_]?token|password)"
    r"(?:['\"]?\s*:\s*b?['\"]|:(?=[^\s'\"])|\s*=\s*b?['\"]?))([^'\"\s,&;]+)")


def remember_secrets(options: Any = None, urls: Any = ()) -> None:
    """Add to the secrets :func:`redact_text` hides: the values under secret keys of storage ``options`` (see
    :func:`redact`), the passwords and secret query parameters of ``urls``, and the credentials of the
    environment (:data:`SECRET_ENVIRONMENT`)."""

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, secret or any(w in str(k).lower() for w in SECRET_OPTION_WORDS))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif isinstance(value, str):
            if secret:
                _add_secret(value)
            else:
                _remember_url(value)
        elif secret and value is not None and not isinstance(value, bool):
            _add_secret(str(value))

    walk(options, False)
    for url in [urls] if isinstance(urls, str) else urls:
        if isinstance(url, str):
            _remember_url(url)
    for name in SECRET_ENVIRONMENT:
        if os.environ.get(name):
            _add_secret(os.environ[name])


def _add_secret(value: str) -> None:
    if len(value) >= _MIN_SECRET:
        _SECRETS.add(value)
        # as a URL or a form would quote it
        from urllib.parse import quote, quote_plus

        _SECRETS.update(v for v in (quote(value, safe=""), quote_plus(value)) if len(v) >= _MIN_SECRET)


def _remember_url(url: str) -> None:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return
    rest, _, query = rest.partition("?")
    userinfo, at, _ = rest.partition("/")[0].rpartition("@")
    if at and ":" in userinfo:
        _add_secret(userinfo.split(":", 1)[1])
    for parameter in query.split("&") if query else ():
        if _redact_parameter(parameter) != parameter:
            _add_secret(parameter.partition("=")[2])


def redact_text(text: str) -> str:
    """``text`` (a log line, a message, a traceback) without the secrets in it: each URL's as :func:`redact_url`
    takes them off, header and signature values as HTTP clients log them, and every value
    :func:`remember_secrets` was given, wherever it stands."""
    if not text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_FIELDS.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A handler's filter: each record it writes goes through :func:`redact_text`, its message with its arguments
    merged in, and its traceback (the record is changed in place: every handler then writes the redacted one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not fit its format: logging reports that
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            import traceback

            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _redact_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    lowered = name.lower()
    if equals and value and (lowered == "sig" or "signature" in lowered
                             or any(w in lowered for w in SECRET_OPTION_WORDS)):
        return f"{name}=<redacted>"
    return parameter


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same storage call may succeed."""
    if isinstance(exc, _PERMANENT):
        return False
    text = f"{type(exc).__name__} {exc}"
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(c in text for c in _TRANSIENT_CODES):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT,
                                                   errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return True
    cause = getattr(exc.__cause__, "response", None)  # s3fs wraps a botocore error it has no class for
    code = cause.get("Error", {}).get("Code") if isinstance(cause, dict) else None
    if code in _TRANSIENT_CODES or code == "ConditionalRequestConflict":  # two conditional puts at once (S3)
        return True
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                         "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                         "ClientOSError", "ClientPayloadError", "IncompleteReadError", "ResponseStreamingError"})


def retrying(url: str, what: str, fn: Callable[[], T], budget_s: float | None = None) -> T:
    """Call ``fn`` (a storage operation on ``url``), retrying transient errors with backoff."""
    if is_local(url):
        return fn()
    budget = budget_s if budget_s is not None else (_budget.get() or RETRY_SECONDS)
    start, attempts, delay = time.monotonic(), 0, 0.25
    deadline = start + budget
    while True:
        attempts += 1
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # classified below: transient ones are retried, others re-raised
            if not is_transient(e):
                raise StorageError(f"{what} {url}: {type(e).__name__}: {e}") from e
            if time.monotonic() + delay > deadline:
                # the elapsed time, not the budget: one attempt may spend seconds in the client's own retries
                raise StorageError(f"{what} {url}: still failing after {attempts} attempts in "
                                   f"{time.monotonic() - start:.0f}s (retry budget {budget:g}s): "
                                   f"{type(e).__name__}: {e}") from e
            log.warning("%s %s: %s; retrying in %.1fs", what, redact_url(url), type(e).__name__, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 8.0)


def modified_stamp(info: dict[str, Any]) -> str:
    """What in an fsspec listing entry changes when the file is rewritten: S3's ETag, else the modification time."""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/' (also for local paths)."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def path_of(url: str) -> str:
    """The file-system path of a local ``url`` (a plain path or ``file://``)."""
    return url[len("file://"):] if url.startswith("file://") else url


_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$|^\..*\.tar\.tmp$|^\.pipeline\.tmp-")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one synthmill gives an unfinished local file: ``X.tmp-<uuid hex>`` (write_bytes,
    put_file), a shard being written (``.000001.*.tar.tmp``) or a pipeline being exported (``.pipeline.tmp-*``)."""
    return bool(_TEMPORARY.search(name))


def remove_stale_temporaries(url: str, before: float) -> int:
    """Delete the temporaries anywhere under the local folder ``url`` last modified before ``before`` (epoch
    seconds): what runs killed while writing left. Newer ones may be another run's into the same folder,
    still writing. Object stores get none (a write there is one request). Returns how many went."""
    if not is_local(url):
        return 0
    removed = 0
    for folder, dirs, files in os.walk(path_of(url)):
        for name in [d for d in dirs if is_temporary(d)] + [f for f in files if is_temporary(f)]:
            path = os.path.join(folder, name)
            try:
                if os.lstat(path).st_mtime >= before:
                    continue
                if name in dirs:
                    dirs.remove(name)
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _publish_local(path: str, data: bytes, publish: Callable[[str, str], T]) -> T:
    """Write ``data`` to a temporary sibling of the local ``path``, then ``publish(tmp, path)`` (a rename, a
    link). Another run's cleaning may take the temporary in between (it takes those older than its own start,
    and a run with nothing to do starts and cleans within milliseconds): then it is written again."""
    for attempt in range(3):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return publish(tmp, path)
        except FileNotFoundError:
            if attempt == 2 or os.path.exists(tmp):
                raise
        except OSError as e:
            raise disk_full(e, path) or e from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise AssertionError("unreachable")


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or all of it."""
    if is_local(url):
        _publish_local(path_of(url), data, os.replace)
        return
    fs, path = filesystem(url, storage_options)
    retrying(url, "write", lambda: fs.pipe_file(path, data))


def create_exclusive(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Write ``data`` to ``url`` only if nothing is there: True if this call made it, False if it was there
    already. Whatever runs at the same moment, one caller makes it, and readers see all of it or nothing.

    Locally the complete data goes to a temporary sibling that is then hard-linked to ``url`` (a link fails
    if the name exists); a file system without hard links gets an exclusive create instead (readers may then
    see the file before its bytes, for microseconds). On an object store it is a conditional put
    (``If-None-Match: *`` on S3, through fsspec's ``mode="create"``). A put whose reply was lost and that is
    retried finds its own object and returns False: callers compare what is there with what they meant to write.
    """
    if is_local(url):
        return _publish_local(path_of(url), data, _link_new)
    fs, path = filesystem(url, storage_options)

    def put() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    return retrying(url, "create", put)


def _link_new(tmp: str, path: str) -> bool:
    """Give the finished file ``tmp`` the name ``path`` unless that name exists (True if it did)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
        try:  # no hard links here: O_EXCL, the one test-and-create every local file system has
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with open(tmp, "rb") as src, os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(src, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return True


def umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, for every thread, while it asks)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def put_file(local_path: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Move or upload a finished local file to ``url``, atomically (see module doc). A local file gets the mode
    any file the user writes gets (temporary files are made private, 0600, and a move keeps that)."""
    if is_local(url):
        dest = path_of(url)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        os.chmod(local_path, 0o666 & ~umask())
        try:
            os.replace(local_path, dest)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"  # another device: copy next to the target, then rename
            try:
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, dest)
            except OSError as e2:
                raise disk_full(e2, dest) or e2 from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return
    fs, path = filesystem(url, storage_options)
    retrying(url, "upload", lambda: fs.put_file(local_path, path))


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``obj`` as sorted, indented JSON, atomically."""
    write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), storage_options)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole object at ``url`` (FileNotFoundError if it does not exist)."""
    fs, path = filesystem(url, storage_options)
    return retrying(url, "read", lambda: fs.cat_file(path))


def read_json(url: str, storage_options: dict[str, Any] | None = None, damaged_as_missing: bool = False) -> Any:
    """Read a JSON file; ``None`` if it does not exist, or with ``damaged_as_missing`` if it is not JSON (a
    marker or summary damaged in place counts as never written: its work is redone)."""
    try:
        return json.loads(read_bytes(url, storage_options))
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a folder on the way is a file
        return None
    except ValueError:  # not JSON, or not UTF-8
        if damaged_as_missing:
            return None
        raise


def read_plan(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An output folder's ``plan.json`` (``None`` if there is none); a damaged one is a SpecError naming it."""
    from synthmill.errors import SpecError

    plan_url = join(url, "plan.json")
    try:
        plan = read_json(plan_url, storage_options)
    except ValueError as e:
        raise SpecError(f"{plan_url}: damaged, not a JSON document ({e}); this folder's job cannot be "
                        "resumed or read") from None
    except (IsADirectoryError, PermissionError) as e:
        raise SpecError(f"{plan_url}: cannot be read ({e.strerror})") from None
    if plan is not None and not isinstance(plan, dict):
        raise SpecError(f"{plan_url}: damaged, not a JSON object; this folder's job cannot be resumed or read")
    return plan


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete one file if it exists."""
    fs, path = filesystem(url, storage_options)
    try:
        retrying(url, "delete", lambda: fs.rm_file(path))
    except FileNotFoundError:
        pass


def list_sizes(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Names (not paths) -> sizes of the files directly in folder ``url``; empty if it does not exist."""
    fs, path = filesystem(url, storage_options)

    def ls() -> list[dict[str, Any]]:
        fs.invalidate_cache(path)  # others write here: never trust a cached listing
        return fs.ls(path, detail=True)

    try:
        entries = retrying(url, "list", ls)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def ahead(items: Iterator[Any], fn: Callable[[Any], T], pool: Executor, depth: int) -> Iterator[T]:
    """``fn(item)`` for each item, in order, with up to ``depth`` of them computed ahead in ``pool``
    (reads of the next files while the caller works on this one)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
