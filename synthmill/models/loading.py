"""Loading a text-to-image pipeline the way a user names it: a hub id or a diffusers folder.

``DiffusionPipeline.from_pretrained`` reads ``model_index.json`` and builds whatever pipeline class
it names (SD 1.x/2.x, SDXL and SSD-1B with their two text encoders, LCM, ...). Safe by default:
only safetensors weights load unless ``model.allow_pickle`` is set, and remote code only with
``model.trust_remote_code``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from concurrent.futures import Future
from typing import Any

from synthmill.errors import SpecError, first_line
from synthmill.sharding import storage

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: Seconds validation waits for the hub to answer about a hub id (huggingface_hub's own default is 10).
HUB_CHECK_TIMEOUT_S = 5.0


def is_hub_id(path: str) -> bool:
    """True when ``path`` is not a local folder and has the ``org/name`` form of a hub id."""
    return not os.path.exists(path) and "://" not in path and bool(_HUB_ID.match(path))


def check_model_path(model: Any, storage_options: dict[str, Any] | None = None, field: str = "model",
                     only_here: bool = False) -> str:
    """Check ``FIELD.path`` without loading anything; return 'hub', 'remote' or 'local'. Raises SpecError.
    ``only_here``: the job runs on a local Ray, this machine its only node (see :func:`check_hub_id`)."""
    path = model.path
    if is_hub_id(path):
        check_hub_id(model, field, only_here)
        return "hub"
    if not storage.is_local(path):
        fs, inner = storage.filesystem(path, storage_options)
        index = f"{inner.rstrip('/')}/model_index.json"
        if not storage.retrying(path, "check", lambda: fs.exists(index)):
            raise SpecError(f"{field}.path {path}: not a diffusers pipeline folder (no model_index.json there)")
        return "remote"
    if not os.path.isdir(path):
        raise SpecError(f"{field}.path {path}: folder not found (and not a hub id of the form org/name)")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise SpecError(f"{field}.path {path}: not a diffusers pipeline folder (no model_index.json)")
    passed = () if getattr(model, "safety_checker", True) else ("safety_checker",)  # load_pipeline passes None
    _check_components(path, field, getattr(model, "variant", None), passed)
    if not model.allow_pickle:
        for root, _, files in os.walk(path):
            weights = [f for f in files if f.endswith(_PICKLE_SUFFIXES + (".safetensors",))]
            if weights and not any(f.endswith(".safetensors") for f in weights):
                pickled = os.path.join(root, weights[0])
                raise SpecError(
                    f"{field}.path {path}: {pickled} is a pickled weight file with no safetensors beside it; "
                    f"set {field}.allow_pickle=true to load it (pickle can run code)"
                )
    return "local"


def model_files(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, list] | None:
    """relative name -> [size, modification time or ETag] of each file of a pipeline folder, local or remote;
    None for a hub id (its revision names its content). What a job's ``plan.json`` records, so that a model
    rewritten in place (a distill run that exports again into the same ``pipeline/``) is not mixed into one
    output with the files it replaced."""
    if is_hub_id(path):
        return None
    fs, inner = storage.filesystem(path, storage_options)
    inner = inner.rstrip("/")
    listing = storage.retrying(path, "list", lambda: fs.find(inner, detail=True))
    files = {}
    for name, info in listing.items():
        rel = name[len(inner):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # .cache/ of huggingface_hub downloads, editors' files
        files[rel] = [int(info.get("size") or 0), storage.modified_stamp(info)]
    return dict(sorted(files.items()))


#: The UNet settings a swapped-in UNet (``model.unet``) must share with the pipeline's own: what its inputs
#: and outputs are and what conditions it. Blocks, widths and depths may differ (a distilled student's do).
UNET_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
                  "addition_time_embed_dim", "projection_class_embeddings_input_dim", "encoder_hid_dim")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes


def _read_json(url: str, storage_options: dict[str, Any] | None) -> Any:
    """The JSON file at ``url`` (local or remote), None when it is not there or not JSON."""
    try:
        return storage.read_json(url, storage_options)
    except (OSError, ValueError, storage.StorageError, SpecError):
        return None


def _pipeline_unet_config(model: Any, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pipeline's own ``unet/config.json`` where it can be read without a download (a folder, or a hub id in
    this machine's cache); None otherwise."""
    if is_hub_id(model.path):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model.path, "unet/config.json", revision=model.revision)
        except Exception:  # noqa: BLE001 - no cache: the load decides
            return None
        return _read_json(cached, None) if isinstance(cached, str) else None
    config = _read_json(storage.join(model.path, "unet", "config.json"), storage_options)
    return config if isinstance(config, dict) else None


def unet_source(model: Any) -> tuple[str, str | None, str | None] | None:
    """(path, subfolder, revision) of ``model.unet`` (a string: the folder or hub repo whose root is the UNet, or a
    section with those keys); None when not given."""
    unet = getattr(model, "unet", None)
    if unet is None:
        return None
    if isinstance(unet, str):
        return unet, None, None
    return unet.path, unet.subfolder, unet.revision


def unet_location(model: Any) -> str | None:
    """Where ``model.unet``'s files are: the folder (its subfolder joined on), or the hub id itself."""
    source = unet_source(model)
    if source is None:
        return None
    path, subfolder, _ = source
    return path if is_hub_id(path) or not subfolder else storage.join(path, subfolder)


def check_unet(model: Any, storage_options: dict[str, Any] | None = None, field: str = "model",
               only_here: bool = False) -> None:
    """``FIELD.unet``: a diffusers UNet folder (config.json naming a UNet class, safetensors weights) whose inputs,
    outputs and conditioning match the pipeline's own UNet (:data:`UNET_INTERFACE`); a hub id is asked of the hub
    (:func:`_hub_unet_config`). Raises SpecError."""
    path, subfolder, revision = unet_source(model)
    label = f"{field}.unet {model.unet}"
    if is_hub_id(path):
        config = _hub_unet_config(model, field, only_here)
        if config is None:
            return  # no answer from the hub nor this machine's cache: the load decides
    else:
        if revision is not None:
            raise SpecError(f"{field}.unet.revision {revision}: only a hub id has revisions ({path} is a folder)")
        config = _folder_unet_config(model, storage_options, label)
    own = _pipeline_unet_config(model, storage_options)
    if own is None:
        return  # a remote hub model not in this machine's cache: the load compares them
    for key in UNET_INTERFACE:
        if config.get(key) != own.get(key):
            raise SpecError(f"{label}: its {key} is {config.get(key)!r}, and the UNet of {field}.path "
                            f"{model.path} has {own.get(key)!r}: the pipeline cannot use it")


def _folder_unet_config(model: Any, storage_options: dict[str, Any] | None, label: str) -> dict[str, Any]:
    """The config.json of ``model.unet``'s folder (local or remote), which must also hold its weights."""
    folder = unet_location(model)
    if storage.is_local(folder):
        if not os.path.isdir(folder):
            raise SpecError(f"{label}: folder not found (a diffusers UNet folder, such as a distill output's "
                            "pipeline/unet)")
        names = os.listdir(folder)
    else:
        fs, inner = storage.filesystem(folder, storage_options)
        found = storage.retrying(folder, "list", lambda: fs.ls(inner, detail=False) if fs.isdir(inner) else [])
        names = [n.rsplit("/", 1)[-1] for n in found]
        if not names:
            raise SpecError(f"{label}: folder not found (a diffusers UNet folder, such as a distill output's "
                            "pipeline/unet)")
    config = _read_json(storage.join(folder, "config.json"), storage_options) if "config.json" in names else None
    if not isinstance(config, dict):
        raise SpecError(f"{label}: not a diffusers UNet folder (no readable config.json)")
    _check_unet_class(config, label)
    suffixes = (".safetensors", ".bin") if model.allow_pickle else (".safetensors",)
    if not any(n.startswith("diffusion_pytorch_model") and n.endswith(suffixes) for n in names):
        raise SpecError(f"{label}: no weights (diffusion_pytorch_model.safetensors)"
                        f"{'' if model.allow_pickle else '; pickled .bin weights load only with model.allow_pickle'}")
    return config


#: The weight files a hub UNet may have, asked for in turn (one file; sharded; pickled, with model.allow_pickle).
_HUB_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
_HUB_UNET_PICKLED = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


def _hub_unet_config(model: Any, field: str, only_here: bool) -> dict[str, Any] | None:
    """The config.json of a hub UNet (``model.unet`` a hub id, in its ``subfolder`` at its ``revision``), asked of
    the hub (``HF_ENDPOINT``) as :func:`check_hub_id` asks for a pipeline, and downloaded into the hub cache (a few
    KB; the load reads it there); its weights are asked for too. From this machine's hub cache when the hub does not
    answer; None when neither has it (the load decides), unless ``only_here`` (see :func:`check_hub_id`)."""
    from huggingface_hub import constants

    path, subfolder, revision = unet_source(model)
    label = f"{field}.unet {model.unet}"
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    silence: list[str] = []
    missing, where = hub_file_missing(path, f"{prefix}config.json", revision, label, silence)
    if missing in ("unknown", "silent"):
        cached = _cached_hub_file(path, f"{prefix}config.json", revision)
        if cached is None:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{where} did not answer"
            if missing == "silent" and only_here:
                raise SpecError(f"{label}: not in the local Hugging Face cache and {why}; connect to the hub once "
                                "to download it (or set HF_ENDPOINT to a mirror), or give a local UNet folder")
            if os.path.isdir(path.split("/")[0]):
                raise SpecError(f"{label}: folder not found ({path.split('/')[0]}/ is here, without "
                                f"{path.split('/', 1)[1]}); as a hub id it was not checked ({why}) and this "
                                "machine's hub cache does not hold it")
            if silence:
                log.info("%s: not checked, %s did not answer (%s)", label, where, silence[0])
            return None
        config = _read_json(cached, None)
        if not isinstance(config, dict):
            return None
        _check_unet_class(config, label)
        return config
    _refuse_missing_repo(missing, label, where)
    if missing == "revision":
        raise SpecError(f"{field}.unet.revision {revision or 'main'}: no such revision of {path} on {where}")
    if missing == "file":
        if subfolder:
            raise SpecError(f"{label}: no {prefix}config.json on {where} (no such subfolder, or not a diffusers "
                            "UNet folder)")
        if hub_file_missing(path, "unet/config.json", revision, label, [])[0] is None:
            raise SpecError(f"{label}: a pipeline repo, its UNet is in unet/ (write {field}.unet: "
                            f"{{path: {path}, subfolder: unet}})")
        raise SpecError(f"{label}: not a diffusers UNet (no config.json on {where}; a UNet in a subfolder of the "
                        f"repo is {field}.unet: {{path: {path}, subfolder: NAME}})")
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(path, "config.json", subfolder=subfolder or None, revision=revision,
                                etag_timeout=HUB_CHECK_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - it was there a moment ago: the load decides
        log.info("%s: config.json not read (%s)", label, first_line(e))
        return None
    config = _read_json(local, None)
    if not isinstance(config, dict):
        raise SpecError(f"{label}: not a diffusers UNet ({prefix}config.json on {where} is not a JSON object)")
    _check_unet_class(config, label)
    weights = _HUB_UNET_WEIGHTS + (_HUB_UNET_PICKLED if model.allow_pickle else ())
    if all(hub_file_missing(path, prefix + name, revision, label, [])[0] == "file" for name in weights):
        raise SpecError(f"{label}: no weights on {where} ({prefix}diffusion_pytorch_model.safetensors)"
                        f"{'' if model.allow_pickle else '; pickled .bin weights load only with model.allow_pickle'}")
    return config


def _check_unet_class(config: dict[str, Any], label: str) -> None:
    """SpecError unless a UNet's ``config.json`` names a UNet class."""
    cls = config.get("_class_name")
    if not (isinstance(cls, str) and cls.startswith("UNet")):
        raise SpecError(f"{label}: not a UNet (its config.json names {cls!r})")


def _cached_hub_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """The local path of ``filename`` of model ``repo_id`` in this machine's hub cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # noqa: BLE001 - an unreadable cache holds nothing we can use
        return None
    return cached if isinstance(cached, str) else None


def _safetensors_keys(read: Any) -> list[str]:
    """The tensor names in a .safetensors file, from its header (no tensor is read); ``read(start, end)`` gives
    those bytes of the file."""
    size = int.from_bytes(read(0, 8), "little")
    if not 0 < size <= 100_000_000:
        raise ValueError("no safetensors header")
    header = json.loads(read(8, 8 + size))
    return [k for k in header if k != "__metadata__"]


def _read_local(path: str) -> Any:
    """``read(start, end)`` of a local file, for :func:`_safetensors_keys`."""
    def read(start: int, end: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)
    return read


def lora_weights(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """The weight file of a ``model.lora`` entry: ``path`` itself when it is a file, else :data:`LORA_FILE` in that
    folder (local or remote)."""
    if storage.is_local(path):
        return os.path.join(path, LORA_FILE) if os.path.isdir(path) else path
    fs, inner = storage.filesystem(path, storage_options)
    if storage.retrying(path, "check", lambda: fs.isfile(inner)):
        return path
    return storage.join(path, LORA_FILE)


def check_lora(model: Any, storage_options: dict[str, Any] | None = None, field: str = "model") -> None:
    """Each ``FIELD.lora.I.path``: a LoRA safetensors file, or a folder holding :data:`LORA_FILE` (local or
    remote), whose tensors are LoRA weights. Raises SpecError."""
    for i, lora in enumerate(model.lora):
        path, label = lora.path, f"{field}.lora.{i}.path {lora.path}"
        file = lora_weights(path, storage_options)
        if storage.is_local(path):
            if not os.path.exists(path):
                raise SpecError(f"{label}: not found")
            if not os.path.isfile(file):
                raise SpecError(f"{label}: no {LORA_FILE} in that folder")
            read = _read_local(file)
        else:
            fs, inner = storage.filesystem(file, storage_options)
            if file != path and not storage.retrying(file, "check", lambda fs=fs, inner=inner: fs.isfile(inner)):
                root = storage.filesystem(path, storage_options)[1]
                there = storage.retrying(path, "check", lambda fs=fs, root=root: fs.exists(root))
                raise SpecError(f"{label}: {f'no {LORA_FILE} in that folder' if there else 'not found'}")

            def read(start: int, end: int, fs=fs, inner=inner, file=file) -> bytes:
                return storage.retrying(file, "read", lambda: fs.cat_file(inner, start=start, end=end))
        if not file.endswith(".safetensors"):
            raise SpecError(f"{label}: not a .safetensors file (LoRA weights load from safetensors only)")
        try:
            keys = _safetensors_keys(read)
        except (OSError, ValueError) as e:
            raise SpecError(f"{label}: not a readable safetensors file ({first_line(e)})") from None
        if not any("lora" in k.lower() for k in keys):
            raise SpecError(f"{label}: holds no LoRA weights (none of its {len(keys)} tensors is a lora_ one)")


def _parts(model: Any, field: str = "model") -> list[tuple[str, str]]:
    """(field, where its files are) of each trained part given: ``FIELD.unet`` (:func:`unet_location`),
    ``FIELD.lora.I.path``."""
    unet = unet_location(model)
    return ([(f"{field}.unet", unet)] if unet else []) + [
        (f"{field}.lora.{i}.path", lora.path) for i, lora in enumerate(model.lora)]


def check_parts(model: Any, storage_options: dict[str, Any] | None = None, field: str = "model",
                only_here: bool = False) -> None:
    """``FIELD.unet`` and ``FIELD.lora``, where given (:func:`check_unet`, :func:`check_lora`); storage that does
    not answer is a SpecError naming the part's field. ``only_here``: as for :func:`check_model_path`."""
    try:
        if model.unet is not None:
            check_unet(model, storage_options, field, only_here)
    except storage.StorageError as e:
        raise SpecError(f"{field}.unet {model.unet}: {e}") from None
    for i, lora in enumerate(model.lora):
        try:
            check_lora(dataclasses.replace(model, lora=[lora]), storage_options, field)
        except SpecError as e:  # the one-entry list calls it 0
            raise SpecError(str(e).replace(f"{field}.lora.0.path", f"{field}.lora.{i}.path", 1)) from None
        except storage.StorageError as e:
            raise SpecError(f"{field}.lora.{i}.path {lora.path}: {e}") from None


def parts_files(model: Any, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, list]]:
    """field -> :func:`model_files` of each trained part (``model.unet``, ``model.lora.I.path``); a single file's
    identity is listed under the name '', a hub id's is none (its revision names its content). What plan.json
    records beside the model's own files."""
    out = {}
    for name, path in _parts(model):
        try:
            out[name] = model_files(path, storage_options) or {}
        except storage.StorageError as e:
            raise SpecError(f"{name} {path}: {e}") from None
    return out


def _check_components(path: str, field: str, variant: str | None, passed: tuple[str, ...] = ()) -> None:
    """A local pipeline folder's ``model_index.json`` is a JSON object whose components (but those in
    ``passed``, which the load passes itself) have their folders; with a ``variant``, some weight file of
    that variant is there."""
    index_file = os.path.join(path, "model_index.json")
    try:
        with open(index_file, encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, ValueError) as e:
        raise SpecError(f"{field}.path {path}: model_index.json cannot be read ({e})") from None
    if not isinstance(index, dict):
        raise SpecError(f"{field}.path {path}: model_index.json is not a JSON object")
    for name, value in index.items():
        present = isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        if not name.startswith("_") and name not in passed and present and not os.path.isdir(os.path.join(path, name)):
            raise SpecError(f"{field}.path {path}: model_index.json names a {name} ({value[1]}) but there is no "
                            f"{name}/ folder")
    if variant:
        weights = [f for _, _, files in os.walk(path) for f in files if f".{variant}." in f]
        if not weights:
            raise SpecError(f"{field}.variant {variant}: no weight file of that variant in {path} (such as "
                            f"diffusion_pytorch_model.{variant}.safetensors)")


def hub_file_missing(repo_id: str, filename: str, revision: str | None, label: str,
                     silence: list[str] | None = None) -> tuple[str | None, str]:
    """Ask the hub (``HF_ENDPOINT``) for ``filename`` of model repo ``repo_id`` at ``revision``, with one HEAD
    request and no download. Returns (what is missing, the endpoint): None when the file is there, 'unknown' when
    no clear answer came (a server error, an HTTP status the hub does not use for a missing file: logged after
    ``label``), 'silent' when none came at all (``HF_HUB_OFFLINE``: nothing asked; no network, a timeout: logged),
    else 'repo' (no such model, or private), 'gated', 'revision' or 'file'. With ``silence``, a list, why no answer
    came is appended to it instead of logged (the caller logs it, or raises)."""
    from huggingface_hub import constants  # alone: milliseconds; the client below, ~0.1 s

    where = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        return "silent", where
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(repo_id, filename, revision=revision)  # on HF_ENDPOINT, as from_pretrained asks
    try:
        get_hf_file_metadata(url, timeout=HUB_CHECK_TIMEOUT_S)
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        return "gated", where
    except RepositoryNotFoundError:
        return "repo", where
    except RevisionNotFoundError:
        return "revision", where
    except RemoteEntryNotFoundError:
        return "file", where
    except Exception as e:  # no clear answer: the load decides
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None:  # e.g. 401 for a token the hub refuses, 429, 5xx
            log.warning("%s: not checked, %s answered HTTP %s (%s)", label, where, status,
                        first_line(e))
            return "unknown", where
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if silence is not None:
            silence.append(why)
        else:
            log.info("%s: not checked, %s did not answer (%s)", label, where, why)
        return "silent", where
    return None, where


#: How to get access to a gated or private hub model; and how to skip the check where only the nodes have it.
HUB_LOGIN = ("HF_TOKEN or `hf auth login`; if only the cluster's nodes have the access or the hub, set "
             "HF_HUB_OFFLINE=1 here to skip this check")


def check_hub_id(model: Any, field: str = "model", only_here: bool = False) -> None:
    """A hub id in ``FIELD.path``: SpecError when the hub says it has no ``model_index.json`` at ``FIELD.revision``
    (no such model, revision or file, or gated); see :func:`hub_file_missing`. Without an answer the load decides,
    maybe from the nodes' caches; but a path whose first folder is here (``models/sd-typo`` beside ``models/``)
    and that this machine's hub cache does not hold either is taken for a local folder that is not there.

    ``only_here``: the job runs on a local Ray, so the only node is this machine, and its cache is the one the
    load reads: a hub that does not answer (no network, ``HF_HUB_OFFLINE``) and a cache without the model
    mean every actor would fail to load it, so that is bad input now, before Ray starts."""
    path, revision = model.path, model.revision
    silence: list[str] = []
    missing, where = hub_file_missing(path, "model_index.json", revision, f"{field}.path {path}", silence)
    if missing in ("unknown", "silent") and not _in_hub_cache(path, "model_index.json", revision):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{where} did not answer"
        parent = path.split("/")[0]
        if missing == "silent" and only_here:
            raise SpecError(f"{field}.path {path}: not in the local Hugging Face cache and {why}; connect to the "
                            "hub once to download it (or set HF_ENDPOINT to a mirror), or give the path of a "
                            "local diffusers folder")
        if os.path.isdir(parent):
            raise SpecError(f"{field}.path {path}: folder not found ({parent}/ is here, without "
                            f"{path.split('/', 1)[1]}); as a hub id it was not checked ({why}) "
                            "and this machine's hub cache does not hold it")
    if silence:
        log.info("%s.path %s: not checked, %s did not answer (%s)", field, path, where, silence[0])
    _refuse_missing_repo(missing, f"{field}.path {path}", where)
    if missing == "revision":
        raise SpecError(f"{field}.revision {revision or 'main'}: no such revision of {path} on {where}")
    if missing == "file":
        raise SpecError(f"{field}.path {path}: not a diffusers pipeline (no model_index.json on {where}"
                        f"{f' at revision {revision}' if revision else ''})")


def _in_hub_cache(repo_id: str, filename: str, revision: str | None) -> bool:
    """Whether this machine's hub cache holds ``filename`` of model ``repo_id`` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except Exception:  # noqa: BLE001 - an unreadable cache holds nothing we can use
        return False


def preload_pipeline_modules(path: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Import the classes a pipeline folder names (pipeline and components), without loading weights;
    return the ``library.Class`` names it imported.

    ``diffusers`` and ``transformers`` import their classes on first use; this lets a caller time
    imports apart from the load. A remote folder's ``model_index.json`` is read where it is, so these
    imports also run while the folder downloads (:func:`fetch_in_background`). Best effort: anything it
    cannot read or resolve (a hub id, an unreachable endpoint) is left for ``from_pretrained``.
    """
    import importlib

    try:
        with storage.retry_budget(5.0):
            index = storage.read_json(storage.join(path, "model_index.json"), storage_options)
    except Exception:  # from_pretrained reports what is wrong with the folder
        return []
    if not isinstance(index, dict):
        return []  # a hub id (no such local file): from_pretrained imports as it goes
    wanted = [("diffusers", index.get("_class_name"))]
    wanted += [tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2]
    imported = []
    for library, name in wanted:
        if library in ("diffusers", "transformers") and isinstance(name, str):
            try:
                getattr(importlib.import_module(library), name)
                imported.append(f"{library}.{name}")
            except (ImportError, AttributeError):
                pass
    return imported


def resolve_dtype(name: str, device: str):
    """``auto`` -> float16 on CUDA, float32 on CPU; else the named torch dtype."""
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def fetch_in_background(model: Any, storage_options: dict[str, Any] | None = None) -> Future | None:
    """For a remote folder (``s3://...``), start copying it to this node's cache (models/fetch.py) on a
    thread and return the future local path; None for a local folder or a hub id.

    An actor calls this before importing torch and diffusers, so that the download (seconds to minutes for a
    full-size model) runs while those imports do (seconds); :func:`load_pipeline` takes the future.
    """
    if storage.is_local(model.path):
        return None
    from synthmill.models.fetch import local_model_path

    fetched: Future = Future()

    def download() -> None:
        fetched.set_running_or_notify_cancel()
        try:
            fetched.set_result(local_model_path(model.path, storage_options))
        except BaseException as e:  # raised by load_pipeline, in the actor's own thread
            fetched.set_exception(e)

    # A daemon thread: an actor that fails before it loads exits without waiting for the download
    # (the next fetch of that model on the node removes the temporary folder it leaves).
    threading.Thread(target=download, name="model-fetch", daemon=True).start()
    return fetched


def load_pipeline(model: Any, device: str, storage_options: dict[str, Any] | None = None,
                  fetched: Future | None = None):
    """Load the pipeline named by ``model`` (a ModelSpec) onto ``device``, ready for inference.

    A remote folder (``s3://...``) is first copied to this node's cache (models/fetch.py), or taken from
    ``fetched``, the future of :func:`fetch_in_background` (whose errors it raises).
    """
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    from synthmill.models.schedulers import apply_scheduler

    diffusers.utils.logging.set_verbosity_error()  # truncation is recorded per sample instead
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(model.dtype, device),
        "use_safetensors": None if model.allow_pickle else True,
    }
    if model.variant:
        kwargs["variant"] = model.variant
    if model.revision:
        kwargs["revision"] = model.revision
    if model.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if model.custom_pipeline:
        kwargs["custom_pipeline"] = model.custom_pipeline
    if not model.safety_checker:
        kwargs["safety_checker"] = None
        kwargs["requires_safety_checker"] = False
    path = model.path
    if fetched is not None:
        path = fetched.result()
    elif not storage.is_local(path):
        from synthmill.models.fetch import local_model_path

        path = local_model_path(path, storage_options)
    unet = unet_source(model)
    if unet is not None:
        from diffusers import UNet2DConditionModel

        where, subfolder, revision = unet
        loads = {"dtype": kwargs["dtype"], "use_safetensors": kwargs["use_safetensors"]}
        if is_hub_id(where):  # through the hub cache, as a hub id in model.path
            loads.update(subfolder=subfolder, revision=revision)
        else:
            where = _local(unet_location(model), storage_options)
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(where, **loads)
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    load_loras(pipe, model, storage_options)
    apply_scheduler(pipe, model.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _local(path: str, storage_options: dict[str, Any] | None) -> str:
    """``path`` itself when local, else this node's cached copy of that folder or file (models/fetch.py)."""
    if storage.is_local(path):
        return path
    from synthmill.models.fetch import local_model_path

    return local_model_path(path, storage_options)


def load_loras(pipe: Any, model: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Load ``model.lora`` into ``pipe`` with diffusers (``load_lora_weights``, one adapter each), weigh them by
    their scales (``set_adapters``), and with ``model.lora_fuse`` fuse them into the weights (``fuse_lora``, then
    ``unload_lora_weights`` drops the adapters and keeps the fused weights)."""
    loras = getattr(model, "lora", None) or []
    if not loras:
        return
    if not hasattr(pipe, "load_lora_weights"):
        raise SpecError(f"model.lora: {type(pipe).__name__} does not load LoRA weights")
    names = []
    for i, lora in enumerate(loras):
        folder, weight = os.path.split(_local(lora_weights(lora.path, storage_options), storage_options))
        names.append(f"lora{i}")
        pipe.load_lora_weights(folder, weight_name=weight, adapter_name=names[-1])
    pipe.set_adapters(names, adapter_weights=[float(lora.scale) for lora in loras])
    if model.lora_fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()


def optimize_pipeline(pipe: Any, model: Any, device: str) -> dict[str, Any]:
    """Apply ``model.channels_last`` and ``model.compile``; return what was applied (for the actor's info).

    Attention needs nothing here: diffusers' default processor (``AttnProcessor2_0``) already calls
    ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA).
    Channels-last lets cuDNN pick its NHWC convolution kernels (tensor cores in fp16). Compiling
    wraps the denoiser and ``vae.decode``; the first call of each batch shape pays the compile.
    """
    import torch

    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"  # DiT-style pipelines
    net, vae = getattr(pipe, name, None), getattr(pipe, "vae", None)
    channels_last = model.channels_last if model.channels_last is not None else device.startswith("cuda")
    if channels_last:
        for module in (net, vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if model.compile:
        mode = None if model.compile_mode == "default" else model.compile_mode
        if net is not None:
            setattr(pipe, name, torch.compile(net, mode=mode))
        if vae is not None:
            vae.decode = torch.compile(vae.decode, mode=mode)
    processors = getattr(net, "attn_processors", None) or {}
    return {
        "channels_last": bool(channels_last),
        "compiled": bool(model.compile),
        "attention": sorted({type(p).__name__ for p in processors.values()}),
    }


def prompt_tokenizer(pipe: Any):
    """The tokenizer that bounds prompt length (CLIP's, 77 tokens), or None for pipelines without one."""
    return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)


def _refuse_missing_repo(missing: str | None, label: str, where: str) -> None:
    """Exit 2 naming ``label`` when the hub says the repo is gated or absent (model.path and model.unet)."""
    if missing == "gated":
        raise SpecError(f"{label}: a gated model on {where}; accept its terms there and log in ({HUB_LOGIN})")
    if missing == "repo":
        raise SpecError(f"{label}: no such folder here and no such model on {where} (a private model needs a "
                        f"token: {HUB_LOGIN})")
