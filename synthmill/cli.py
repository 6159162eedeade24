"""The ``synthmill`` command (docs/design.md, "Command line"). It knows no job kind by name: each comes from
the table :data:`synthmill.jobs.kinds.KINDS`.

Exit codes: 0 success; 2 invalid spec or bad input (one line naming the field or file, before any
model loads and before anything is written); 1 the job ran and failed (the failed shards are named).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from synthmill.errors import DiskFull, JobFailed, SpecError

log = logging.getLogger("synthmill")


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser: options may come anywhere among its positionals (``run JOB.yaml --dry-run a=1``).

    A plain parser ends ``overrides`` at the first option: what follows it is "unrecognized". argparse's
    intermixed parsing cannot be asked of the top-level parser (it has sub-commands), so each command's
    parser parses that way; it calls ``parse_known_args`` itself, which then parses as usual.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthmill", description="Generate and judge diffusion-model images on Ray.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    run = sub.add_parser("run", help="run a job (any kind)")
    run.add_argument("spec", help="job spec YAML")
    run.add_argument("overrides", nargs="*", default=[], help="key=value overrides (OmegaConf dotlist)")
    run.add_argument("--dry-run", action="store_true", help="print the plan without running anything")
    val = sub.add_parser("validate", help="check a spec and its inputs without running")
    val.add_argument("spec")
    val.add_argument("overrides", nargs="*", default=[])
    st = sub.add_parser("status", help="progress of an output folder")
    st.add_argument("output", help="output folder, or the job spec YAML (its output.path and storage options)")
    st.add_argument("overrides", nargs="*", default=[], help="with a job spec: key=value overrides")
    st.add_argument("--json", action="store_true", help="print machine-readable JSON")
    rep = sub.add_parser("report", help="one self-contained HTML page about outputs (generate, evaluate, distill, "
                         "filter, study)")
    rep.add_argument("outputs", nargs="+", metavar="PATH", help="output folders (local or URLs)")
    rep.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default: report.html)")
    for sp in (run, val, st, rep):
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(args: argparse.Namespace) -> int:
    from synthmill.jobs.kinds import KINDS
    from synthmill.jobs.spec import load_spec

    if args.command == "status":
        from synthmill.jobs import status
        from synthmill.sharding import storage

        output, opts = args.output, None
        if args.output.endswith((".yaml", ".yml")):
            if not os.path.isfile(args.output):
                raise SpecError(f"{args.output}: spec file not found")
            spec = load_spec(args.output, args.overrides)
            _remember_secrets_of(spec)
            output, opts = spec.output.path, spec.storage
        elif args.overrides:
            raise SpecError(f"{args.output}: key=value overrides need a job spec YAML, not an output folder")
        else:
            from synthmill.sharding.storage import remember_secrets

            remember_secrets(urls=[output])
        try:
            with storage.retry_budget(status.RETRY_S):
                st = status.collect(output, opts)
        except storage.StorageError as e:  # unreachable, refused: it names the URL
            raise SpecError(str(e)) from None
        except OSError as e:  # a local folder that cannot be read: a loop of links, no permission
            raise SpecError(f"{output}: cannot be read ({e.strerror or e})") from None
        print(json.dumps(st, indent=1) if args.json else status.render(st))
        return 0
    if args.command == "report":
        from synthmill.jobs import report
        from synthmill.sharding.storage import remember_secrets

        remember_secrets(urls=[*args.outputs, args.out])
        size = report.write_report(args.outputs, args.out)
        print(f"report: {args.out} ({len(args.outputs)} output{'s' if len(args.outputs) > 1 else ''}, "
              f"{size / 1e6:.1f} MB)")
        return 0
    spec = load_spec(args.spec, args.overrides)
    _remember_secrets_of(spec)
    job = KINDS[spec.kind].module()  # only this kind's runner is imported (imports cost seconds)
    prepared = job.prepare(spec)
    if args.command == "validate" or args.dry_run:
        plan = job.plan_summary(prepared)
        print(job.ok_line(args.spec, plan) if args.command == "validate" else json.dumps(plan, indent=1))
        return 0
    summary = job.run(prepared)
    print(job.done_line(summary, spec.output.path))
    return 0


def _remember_secrets_of(spec) -> None:
    """Hide the secrets of ``spec`` (its storage options', its URLs' passwords) from every line printed or logged."""
    from omegaconf import OmegaConf

    from synthmill.jobs.kinds import KINDS
    from synthmill.jobs.spec import expand_field
    from synthmill.sharding.storage import remember_secrets

    urls = [OmegaConf.select(OmegaConf.structured(spec), dotted) for pattern in KINDS[spec.kind].paths
            for dotted in expand_field(spec, pattern)]
    remember_secrets(spec.storage, [u for u in urls if isinstance(u, str)])


def _hide_passwords(message: str) -> str:
    """``message`` without secrets: a ``scheme://user:password@`` URL's password, a presigned URL's signature, the
    values of the spec's secret storage options wherever they stand (``storage.redact_text``)."""
    from synthmill.sharding.storage import redact_text

    return redact_text(message)


def _one_line(message: str) -> str:
    """A message on one line, whatever a path or value quoted in it holds, without a URL's password."""
    message = _hide_passwords(message)
    return "\\n".join(message.splitlines()) or message  # splitlines: \n, \r, \x0b, \x1c, \u2028, ...


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``kill PID``, a container or job scheduler stopping the job): stopped like Ctrl-C.

    A KeyboardInterrupt, since Ray's waits let only that through (they turn it into a new KeyboardInterrupt, and
    any other exception into a SystemError): :data:`_terminated` tells the two apart afterwards."""


_terminated = False


def _terminate(signum: int, frame) -> None:
    global _terminated
    _terminated = True
    raise Terminated


#: What Ctrl-C and SIGTERM say: the job stops where it is and nothing committed is lost.
RESUMES = "what was committed is kept, and the same command resumes from it"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    global _terminated
    args = _parser().parse_args(argv)
    _terminated = False
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from synthmill.sharding.storage import RedactingFilter, remember_secrets

    remember_secrets()  # the environment's credentials; the spec's when it is loaded
    for handler in logging.getLogger().handlers:  # library loggers' records too (botocore's, fsspec's at -v)
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        code = _main(args)
        sys.stdout.flush()  # here, where a reader that went away (`| head`) is caught below, not at exit
        return code
    except BrokenPipeError:
        # stdout's reader stopped reading: nothing more to tell it, and no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except KeyboardInterrupt:
        if _terminated:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (the rest of a group's) waits for the end
            print(f"synthmill: terminated (SIGTERM); {RESUMES}", file=sys.stderr)
            return 143  # what a shell reports for a process ended by SIGTERM
        print(f"synthmill: interrupted; {RESUMES}", file=sys.stderr)
        return 130
    except SpecError as e:
        print(f"synthmill: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except DiskFull as e:  # the driver's own write (plan.json, index.parquet, summary.json, failures.json)
        print(f"synthmill: error: {_one_line(str(e))}; what was committed is kept, and the same command resumes "
              "once there is room", file=sys.stderr)
        return e.exit_code
    except JobFailed as e:
        print(f"synthmill: job failed: {_hide_passwords(str(e))}", file=sys.stderr)
        return e.exit_code
    finally:
        from synthmill.cluster.connect import shutdown_local, started_local_ray

        if _terminated and started_local_ray():  # a local Ray's processes go at once, and so does this one
            shutdown_local(now=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(143)
        shutdown_local()  # the local Ray a job started here, if any, before the interpreter's slower exit
        if main_thread and not _terminated:  # a caller in this process (a test) gets its own handler back
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
