"""The ``synthmill`` command (DESIGN.md, "Command line").

Exit codes: 0 success; 2 invalid spec or bad input (one line naming the field or file, before any
model loads and before anything is written); 1 the job ran and failed (the failed shards are named).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from synthmill.errors import JobFailed, SpecError

log = logging.getLogger("synthmill")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthmill", description="Generate and judge diffusion-model images on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job (any kind)")
    run.add_argument("spec", help="job spec YAML")
    run.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    run.add_argument("--dry-run", action="store_true", help="print the plan without running anything")
    val = sub.add_parser("validate", help="check a spec and its inputs without running")
    val.add_argument("spec")
    val.add_argument("overrides", nargs="*")
    st = sub.add_parser("status", help="progress of an output folder")
    st.add_argument("output")
    st.add_argument("--json", action="store_true", help="print machine-readable JSON")
    for sp in (run, val, st):
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _prepare(args: argparse.Namespace):
    from synthmill.jobs import generate
    from synthmill.jobs.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    return generate.prepare(spec)


def _main(args: argparse.Namespace) -> int:
    from synthmill.jobs import generate

    if args.command == "status":
        from synthmill import status

        st = status.collect(args.output)
        print(json.dumps(st, indent=1) if args.json else status.render(st))
        return 0
    prepared = _prepare(args)
    if args.command == "validate" or args.dry_run:
        plan = generate.plan_summary(prepared)
        if args.command == "validate":
            print(f"ok: {args.spec}: {plan['prompts']} prompts -> {plan['samples']} samples in {plan['shards']} shards")
        else:
            print(json.dumps(plan, indent=1))
        return 0
    summary = generate.run(prepared)
    print(
        f"done: {summary['samples']} samples in {summary['shards']} shards at {prepared.spec.output.path} "
        f"({summary['shards_resumed']} shards resumed, {summary['samples_run']} samples generated in "
        f"{summary['elapsed_s']:.1f}s, {summary['images_per_s']:.2f} images/s; retries {summary['retries']}, "
        f"truncated prompts {summary['truncated_prompts']}, blank prompts {summary['blank_prompts']})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _main(args)
    except SpecError as e:
        print(f"synthmill: error: {e}", file=sys.stderr)
        return e.exit_code
    except JobFailed as e:
        print(f"synthmill: job failed: {e}", file=sys.stderr)
        return e.exit_code


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
