"""``synthmill report PATH... -o report.html``: one self-contained HTML page about any synthmill outputs
(docs/report.md). A study's finish step calls :func:`build_report` for its own ``OUTPUT/report.html``.

Each PATH's ``plan.json`` says its kind, and the table :data:`SECTIONS` names the section that kind gets. The
page needs no server and nothing beside it: plots are matplotlib SVGs and thumbnails small JPEGs, both
embedded as ``data:`` URIs. Big outputs stay fast: thumbnails are a fixed, seeded sample (at most
``report_html.CONTACT_SHEET`` per output), read from as few tars as that sample touches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from synthmill.errors import SpecError
from synthmill.jobs import report_distill, report_evaluate, report_generate, report_html, report_study
from synthmill.sharding import storage
from synthmill.sharding.layout import OutputLayout

#: output kind (plan.json's ``kind``) -> its section: ``(layout, plan, title) -> HTML``. A filter output is a
#: dataset of a generate output's shape, so it gets the same section.
SECTIONS: dict[str, Callable[[OutputLayout, dict[str, Any], str], str]] = {
    "generate": report_generate.section,
    "filter": report_generate.section,
    "evaluate": report_evaluate.section,
    "distill": report_distill.section,
    "study": report_study.section,
}


def build_report(paths: list[str], storage_options: dict | None = None) -> str:
    """The HTML page about the outputs at ``paths`` (local folders or URLs), in the order given.

    A path that is not a synthmill output, or one of a kind the report has no section for, is a SpecError
    naming it, raised before any section is built."""
    if not paths:
        raise SpecError("report: no output path given")
    outputs = [(path, *_kind_of(path, storage_options)) for path in paths]
    sections = [SECTIONS[kind](layout, plan, f"{kind}: {storage.redact_url(path)}")
                for path, layout, plan, kind in outputs]
    names = ", ".join(storage.redact_url(p).rstrip("/").rsplit("/", 1)[-1] for p in paths)
    return report_html.page(f"synthmill report: {names}", sections)


def write_report(paths: list[str], out: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Build the page and write it to ``out`` (a local path or URL); return its size in bytes."""
    data = build_report(paths, dict(storage_options) if storage_options else None).encode("utf-8")
    storage.write_bytes(out, data, dict(storage_options) if storage_options else None)
    return len(data)


def _kind_of(path: str, storage_options: dict | None) -> tuple[OutputLayout, dict[str, Any], str]:
    try:
        plan = storage.read_plan(path, storage_options)
    except storage.StorageError as e:
        raise SpecError(str(e)) from None
    except OSError as e:  # a path that cannot be read as a folder (a file, no permission)
        raise SpecError(f"{path}: not a synthmill output ({e.strerror or e})") from None
    if plan is None:
        raise SpecError(f"{path}: not a synthmill output (it has no plan.json)")
    kind = plan.get("kind")
    if kind not in SECTIONS:
        raise SpecError(f"{path}: a synthmill output of kind {kind!r}, which the report has no section for "
                        f"(it knows {', '.join(SECTIONS)})")
    return OutputLayout(path, storage_options), plan, kind
