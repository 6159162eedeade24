"""Loading a job spec: YAML + ``key=value`` overrides -> a typed, validated dataclass.

Each job kind owns a dataclass schema (the table :data:`synthmill.jobs.kinds.KINDS` maps ``kind:`` to it).
The YAML is merged into the schema with OmegaConf in struct mode, so unknown keys and wrong types fail here, with the
field's dotted path and, for a misspelt key, the closest known one. Ranges and cross-field rules are checked
by the schema's own ``check()`` method. No custom resolvers are registered: a spec never runs code.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any, Union

from synthmill.errors import SpecError, first_line
from synthmill.sharding.nodes import NodePath


def ray_job_working_dir() -> str | None:
    """The ``working_dir`` of the Ray job this process is the entrypoint of (``ray job submit --working-dir``).

    Ray's job supervisor starts the entrypoint in the node's copy of that folder and passes the job's
    runtime environment in ``RAY_JOB_CONFIG_JSON_ENV_VAR``; every actor of the job runs in its own node's copy.
    """
    import json

    try:
        env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = env.get("working_dir") if isinstance(env, dict) else None
    return str(working_dir) if working_dir else None


def resolve_paths(spec: Any, paths: Mapping[str, str]) -> None:
    """Make the spec's local paths absolute (against the directory synthmill runs in) and spelt one way.

    ``paths`` names the schema's fields that may hold a local path, and how each is read: ``"input"`` (a file
    or folder to read), ``"output"`` (the job's output folder), ``"name_or_path"`` (a hub id or name, or a local
    folder or file when one exists at that path), ``"file_or_name"`` (a name, or a file when one exists
    there), ``"arch"`` (a student layout's name or ``teacher``, else as ``"name_or_path"``), ``"init"`` (``teacher`` or
    ``random``, else as ``"input"``) and ``"clip"`` (an open_clip name,
    ``local-dir:PATH`` among them). A leading ``~`` is the user's home.

    Ray's actors and workers do not run in the driver's directory: on a cluster joined through an address
    they run where that cluster was started. A relative path would name another file there (or none), and a
    relative output folder would be split between the driver's and the actors' directories. Remote URLs,
    hub ids and names stay as they are.

    Under ``ray job submit --working-dir`` every process of the job runs in its own node's copy of that folder,
    so relative inputs stay relative (each resolves in its copy), and a relative ``output.path`` is refused:
    each node would write into its own copy, which Ray may delete once the job ends.
    """
    working_dir = ray_job_working_dir()
    for dotted, how in ((f, how) for pattern, how in paths.items() for f in expand_field(spec, pattern)):
        *parents, leaf = dotted.split(".")
        section = field_value(spec, ".".join(parents)) if parents else spec
        value = getattr(section, leaf)
        prefix = "local-dir:" if how == "clip" and isinstance(value, str) and value.startswith("local-dir:") else ""
        if not isinstance(value, str) or (how == "clip" and not prefix):
            continue
        if value.startswith("file://"):  # a local path too
            prefix = "file://"
        path = value[len(prefix):]
        if not path or "://" in path or "::" in path:
            continue
        if path.startswith("~"):  # a shell would have expanded it; the image and weight readers did
            path = os.path.expanduser(path)
        if how == "output" and working_dir and not os.path.isabs(path):
            raise SpecError(
                f"field '{dotted}': {value!r} is relative, and this job runs in Ray's copy of its working_dir "
                f"({os.getcwd()}): each node would write into its own copy, which Ray may delete once the job "
                "ends; give an absolute path on storage every node shares, or an s3:// URL")
        if how == "arch":
            from synthmill.models.students import arch_name

            if arch_name(path) or path == "teacher":  # a layout's name, or method lcm's keyword (the teacher's own)
                continue
        if how == "init" and path in ("teacher", "random"):
            continue  # a keyword of student.init, not a folder
        if how == "file_or_name" and not os.path.isfile(path):
            continue  # a name (a pretrained tag), as its reader takes it
        if (working_dir and not os.path.isabs(path)) or (how in ("name_or_path", "arch") and not os.path.exists(path)):
            continue
        setattr(section, leaf, prefix + _tidy(os.path.join(os.getcwd(), path)))


def _tidy(path: str) -> str:
    """Absolute ``path`` spelt one way: no empty or ``.`` parts, no trailing ``/``, and each ``..`` folded into the
    part before it, unless that part is a symbolic link (``lnk/..`` is the folder above the link's target, which
    only the file system can say, so it stays as written)."""
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and out and out[-1] != ".." and not os.path.islink("/" + "/".join(out)):
            out.pop()
            continue
        out.append(part)
    return "/" + "/".join(out)


def _known_keys(schema: type, dotted: str) -> list[str]:
    """The field names of the section at ``dotted`` (the parent of a bad key) in a dataclass schema."""
    import typing

    cls = schema
    for part in [p for p in dotted.split(".") if p]:
        cls = typing.get_type_hints(cls).get(part)
        if cls is None or not dataclasses.is_dataclass(cls):
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _explain(exc: Exception, schema: type, source: str) -> SpecError:
    """Turn an OmegaConf error into one line naming the field and the fix."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    full_key = getattr(exc, "full_key", None) or ""
    first = first_line(exc)
    if isinstance(exc, ConfigKeyError) and full_key:
        parent, _, leaf = full_key.rpartition(".")
        known = _known_keys(schema, parent)
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"; did you mean '{(parent + '.' if parent else '') + close[0]}'?" if close else ""
        return SpecError(
            f"{source}: unknown key '{full_key}'{hint} (known keys here: {', '.join(known) or 'none'})"
        )
    if isinstance(exc, ValidationError):
        where = f"field '{full_key}'" if full_key else "a section"
        return SpecError(f"{source}: {where}: {first}")
    return SpecError(f"{source}: {first}")


def _kind_of_value(value: Any) -> str:
    """``a string 'x'``, ``a number 3``, ``a list [...]``: what a YAML value is, for messages."""
    kinds = ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"), (list, "a list"))
    name = next((n for t, n in kinds if isinstance(value, t)), f"a {type(value).__name__}")
    return f"{name} {value!r}"


def _container(cls: Any) -> type | None:
    """``dict`` for a section (a dataclass) or a ``Dict[...]`` field, ``list`` for a ``List[...]`` field, else None."""
    import typing

    if dataclasses.is_dataclass(cls):
        return dict
    origin = typing.get_origin(cls)
    if origin is Union:  # Optional[Dict[...]]
        inner = [a for a in typing.get_args(cls) if a is not type(None)]
        return _container(inner[0]) if len(inner) == 1 else None
    return origin if origin in (dict, list) else None


def _scalar_section(schema: type, data: Any, prefix: str = "") -> tuple[str, Any, type] | None:
    """(dotted field, value, wanted container) of the first field of ``schema`` that must be a mapping (a
    section or a ``Dict`` field) or a list and that ``data`` gives a value of another shape.

    OmegaConf reports those as "Merge error: str is not a subclass of ModelSpec" or "Cannot merge
    incompatible container types" without naming the field.
    """
    import typing

    if not isinstance(data, dict):
        return None
    hints = typing.get_type_hints(schema)
    for name, value in data.items():
        cls = hints.get(name) if isinstance(name, str) else None
        want = _container(cls)
        if want is None or value is None:
            continue  # unknown keys, plain fields and nulls: OmegaConf names them
        if want is list:
            if not isinstance(value, list):  # OmegaConf: "AnyNode is not a ListConfig, TupleConfig, ..."
                return prefix + name, value, list
            continue
        if not isinstance(value, dict):
            return prefix + name, value, dict
        found = _scalar_section(cls, value, f"{prefix}{name}.") if dataclasses.is_dataclass(cls) else None
        if found:
            return found
    return None


def _check_sections(schema: type, data: Any, source: str) -> None:
    """Raise a :class:`SpecError` naming the field when ``data`` gives a section of ``schema`` a scalar or a list."""
    found = _scalar_section(schema, data)
    if found:
        dotted, value, want = found
        if want is list:
            got = f"a mapping {value!r}" if isinstance(value, dict) else _kind_of_value(value)
            example = f" (write [{value}])" if isinstance(value, str) else ""
            raise SpecError(f"{source}: field '{dotted}': must be a list, got {got}{example}")
        keys = [f"{dotted}.{k}" for k in _known_keys(schema, dotted)]
        shown = ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "") if keys else "name: value"
        raise SpecError(f"{source}: field '{dotted}': must be a section of keys ({shown}), got {_kind_of_value(value)}")


def _check_keys(data: Any, source: str, prefix: str = "") -> None:
    """Raise a :class:`SpecError` for a mapping key that is not a name (``null:``, ``1:``, ``[a]:``)."""
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                where = f"section '{prefix[:-1]}'" if prefix else "the top level"
                raise SpecError(f"{source}: key {key!r} in {where} is not a name (keys are strings)")
            _check_keys(value, source, f"{prefix}{key}.")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _check_keys(value, source, f"{prefix}{i}.")


#: Why a spec may not hold ``${...}``: OmegaConf would resolve it (``${oc.env:AWS_SECRET_ACCESS_KEY}`` copies a
#: secret into job.yaml, every shard and the index), and a spec never runs code.
_NO_EXPRESSIONS = ("holds an interpolation '${...}'; a spec takes no expressions: put the value itself, or "
                   "substitute it before synthmill reads the file (synthmill run <(envsubst < job.yaml))")


def _check_interpolations(data: Any, source: str, prefix: str = "") -> None:
    """Raise a :class:`SpecError` naming the field of the first value (or key) that holds ``${``."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if (isinstance(value, str) and "${" in value) or (isinstance(key, str) and "${" in key):
            raise SpecError(f"{source}: field '{prefix}{key}': {_NO_EXPRESSIONS}")
        _check_interpolations(value, source, f"{prefix}{key}.")


def _check_strings(data: Any, source: str, prefix: str = "") -> None:
    """Raise a :class:`SpecError` for a string value with a NUL character (no path or name can hold one)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(value, str) and "\0" in value:
            raise SpecError(f"{source}: field '{prefix}{key}': contains a NUL character")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate from a "\udcff" escape: no file name can hold it
                raise SpecError(f"{source}: field '{prefix}{key}': holds {ascii(value)}, not UTF-8 text") from None
        _check_strings(value, source, f"{prefix}{key}.")


#: Limits on a spec file: its size, and the values it expands to (YAML aliases repeat a value without
#: copying it; "billion laughs" specs expand to 10**9) and how deeply they nest.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_VALUES = 100_000
MAX_SPEC_DEPTH = 64


def _duplicate_key(root: Any) -> tuple[str, int, int] | None:
    """(key, line, first line) of the first key given twice in one mapping of a composed YAML document.

    Checked on the node graph before anything is constructed: PyYAML keeps the last value silently, and
    merging (``<<: *base``) rewrites mappings in place as it constructs them, so a key a mapping overrides
    from its base is not a duplicate; only a mapping's own keys are compared.
    """
    import yaml

    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes or not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
            continue
        keys: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            stack.extend((key, value))
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in keys:
                    return key.value, line, keys[(key.tag, key.value)]
                keys[(key.tag, key.value)] = line
    return None


def _read_yaml(path: str) -> Any:
    """The YAML document of the spec file at ``path``; SpecError for anything that is not one."""
    if os.path.isdir(path):
        raise SpecError(f"{path}: a folder, not a spec file")
    try:
        with open(path, "rb") as fh:  # not only a file: `synthmill run <(envsubst < job.yaml)` reads a pipe
            data = fh.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec file: {e.strerror}") from None
    return _parse_yaml(data, path)


def _parse_yaml(data: bytes, path: str) -> Any:
    """The YAML document in ``data`` (read from ``path``); SpecError naming ``path`` for anything that is not one."""
    import yaml

    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: over {MAX_SPEC_BYTES} bytes; a spec file is at most that")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: a spec file must be UTF-8 text; byte {e.start} is not") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        duplicate = _duplicate_key(root) if root is not None else None
        if duplicate:
            key, line, first = duplicate
            where = f"line {line}" if line == first else f"lines {first} and {line}"
            raise SpecError(f"{path}: key '{key}' is given twice in one mapping ({where}); "
                            "YAML would keep the last silently")
        return loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{path}: values nested too deeply (at most {MAX_SPEC_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _check_size(data: Any, source: str) -> None:
    """Refuse a document that expands to more than MAX_SPEC_VALUES values or nests deeper than MAX_SPEC_DEPTH.

    Counted without expanding: each mapping or list (shared ones once, as aliases share them) is sized from
    its children's sizes, in an explicit stack rather than by recursion."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(f"{source}: values nested too deeply (at most {MAX_SPEC_DEPTH} levels)")
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None or id(node) in sizes:
            continue
        if not done:
            stack.append((node, depth, True))
            stack.extend((c, depth + 1, False) for c in children if isinstance(c, (dict, list)) and id(c) not in sizes)
            continue
        sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
        if sizes[id(node)] > MAX_SPEC_VALUES:
            raise SpecError(f"{source}: expands to more than {MAX_SPEC_VALUES} values (YAML aliases repeat "
                            "a value each time they are used); a job spec is far smaller")


def _override_error(overrides: list[str] | tuple[str, ...], exc: Exception) -> SpecError:
    """One line naming the override that OmegaConf's dotlist parser (which reads values as YAML) rejects."""
    from omegaconf import OmegaConf

    for o in overrides:  # the first that fails alone
        try:
            OmegaConf.from_dotlist([o])
        except Exception as e:  # noqa: BLE001 - YAML or OmegaConf errors, reported below
            problem = getattr(e, "problem", None) or first_line(e)
            what = "its value is not valid YAML" if getattr(e, "problem", None) else "cannot be read"
            return SpecError(f"override '{o}': {what}: {problem}")
    return SpecError(f"overrides: {first_line(exc)}")


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load ``path`` (a local YAML file) with dotlist ``overrides`` into the schema of its ``kind``.

    Raises :class:`SpecError` for a missing or malformed file, an unknown kind, unknown keys, wrong
    types, or values that the schema's ``check()`` rejects.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from synthmill.jobs.kinds import KINDS

    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job spec must be a YAML mapping with a 'kind' key")
    _check_size(raw, path)
    bad = [o for o in overrides if "=" not in o or "" in o.partition("=")[0].split(".")]
    if bad:
        raise SpecError(f"override '{bad[0]}' is not of the form key=value (a key is dotted names: output.path=...)")
    for o in overrides:
        try:
            o.encode("utf-8")
        except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (Python keeps them as surrogates)
            raise SpecError(f"override {ascii(o)}: not UTF-8 text") from None
    _check_keys(raw, path)
    _check_interpolations(raw, path)
    for o in overrides:
        if "${" in o:
            raise SpecError(f"override '{o}': {_NO_EXPRESSIONS}")
    try:
        over = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # a value is parsed as YAML: 'a.b=[1' fails there
        raise _override_error(overrides, e) from None
    kind = over.get("kind", raw.get("kind"))
    if not isinstance(kind, str) or kind not in KINDS:
        known = ", ".join(sorted(KINDS))
        raise SpecError(f"{path}: field 'kind' is {kind!r}; known kinds: {known}")
    schema = KINDS[kind].spec
    _check_sections(schema, raw, path)
    for o in overrides:  # each alone, to name the one that gives a section a value
        _check_sections(schema, OmegaConf.to_container(OmegaConf.from_dotlist([o])), f"override '{o}'")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(raw), over)
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SpecError(f"{path}: field '{missing[0]}' is required and has no value")
        _check_strings(OmegaConf.to_container(cfg), path)
        spec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, path) from None
    resolve_paths(spec, KINDS[kind].paths)
    spec.check()
    check_output_outside_inputs(spec, KINDS[kind].paths)
    return spec


def spec_of_output(data: bytes, source: str) -> Any:
    """The spec in an output's ``job.yaml`` (``data``, read from ``source``), typed by its kind's schema.

    That file is the spec as synthmill resolved it for the job (its paths absolute, its secrets redacted), so
    nothing is resolved or checked again: the inputs it names may be on another machine, or gone, and a
    reader of the output (``synthmill status``, a job reading it) only compares it with ``plan.json``. Keys
    added since it was written take their defaults, which leave fingerprints as they were. SpecError naming
    ``source`` for a file that is not such a spec.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from synthmill.jobs.kinds import KINDS

    raw = _parse_yaml(data, source)
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job spec must be a YAML mapping with a 'kind' key")
    _check_size(raw, source)
    _check_keys(raw, source)
    _check_interpolations(raw, source)
    kind = raw.get("kind", "generate")  # as plan.json, the first outputs were all of generate jobs
    if not isinstance(kind, str) or kind not in KINDS:
        raise SpecError(f"{source}: field 'kind' is {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    schema = KINDS[kind].spec
    _check_sections(schema, raw, source)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(raw))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise SpecError(f"{source}: field '{missing[0]}' is required and has no value")
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, source) from None


def _folder_key(value: str) -> tuple[str, str] | None:
    """(where, path) that says which folder ``value`` names, comparable with another's: a local folder's real
    path, or a remote URL without its trailing ``/``; None for what is not a folder (a file, a name, a glob,
    a chained URL)."""
    if "::" in value or any(c in value for c in "*?["):
        return None
    if "://" in value and not value.startswith("file://"):
        scheme, _, rest = value.partition("://")
        return scheme, rest.rstrip("/")
    path = os.path.expanduser(value[len("file://"):] if value.startswith("file://") else value)
    if not os.path.isabs(path):
        return None
    return "", os.path.realpath(path)


def check_output_outside_inputs(spec: Any, paths: Mapping[str, str]) -> None:
    """``output.path`` must not be an input folder, nor inside one: the job would write into what it reads (a
    model folder whose file list then changes under every rerun, an image or data folder that it lists). The
    inputs are the fields read as a file or folder (``input``, ``init``) or as a model folder (``name_or_path``,
    ``arch``).
    SpecError naming both fields."""
    outputs = [f for f, how in paths.items() if how == "output"]
    for out_field in outputs:
        out = field_value(spec, out_field)
        out_key = _folder_key(out) if isinstance(out, str) and out else None
        if out_key is None:
            continue
        for dotted, how in ((f, how) for pattern, how in paths.items() for f in expand_field(spec, pattern)):
            value = field_value(spec, dotted)
            if how not in ("input", "name_or_path", "arch", "init") or not isinstance(value, str) or not value:
                continue  # not an input, or one read by name (a CLIP folder's files are not listed)
            key = _folder_key(value)
            if key is None or key[0] != out_key[0] or (not key[0] and not os.path.isdir(key[1])):
                continue
            if out_key[1] == key[1] or out_key[1].startswith(key[1].rstrip("/") + "/"):
                where = "is that same folder" if out_key[1] == key[1] else "is inside it"
                raise SpecError(
                    f"field '{out_field}': {out} {where}, the input folder of '{dotted}' ({value}); the job would "
                    f"write into what it reads, and a rerun would find '{dotted}' changed by its own output: "
                    "choose an output folder outside it")


def field_value(spec: Any, dotted: str) -> Any:
    """The value of the field ``dotted`` (``output.path``, ``model.lora.0.path``) of a loaded spec."""
    value = spec
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, (list, tuple)) else getattr(value, part)
    return value


def expand_field(spec: Any, pattern: str) -> list[str]:
    """The fields a ``PATHS`` key names: itself, or for ``model.lora.*.path`` one per item of that list; none when
    the section that would hold it is not given (``model.unet.path`` while ``model.unet`` is null)."""
    if ".*." not in pattern:
        head, _, leaf = pattern.rpartition(".")
        parent = field_value(spec, head) if head else spec
        return [pattern] if dataclasses.is_dataclass(parent) and hasattr(parent, leaf) else []
    head, tail = pattern.split(".*.", 1)
    items = field_value(spec, head) or []
    return [f for i in range(len(items)) for f in expand_field(spec, f"{head}.{i}.{tail}")]


def node_paths(spec: Any, fields: tuple[str, ...]) -> list[NodePath]:
    """The local paths among ``fields`` of ``spec`` (``PATHS`` keys) that every node must see, for actors to check."""
    from synthmill.jobs.kinds import KINDS

    paths = KINDS[spec.kind].paths
    return [NodePath(f, v, paths[pattern]) for pattern in fields for f in expand_field(spec, pattern)
            if isinstance(v := field_value(spec, f), str) and v]
