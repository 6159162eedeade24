"""Inception features for FID and class logits for IS, each exactly as its reference library makes them.

Networks are the libraries' own definitions, loaded from one verified weights file
(:mod:`synthmill.metrics.weights`):

- FID features (2048-d pool3) come from pytorch-fid's ``InceptionV3`` wrapper. Its constructor
  downloads the standard file through ``load_state_dict_from_url``; we hand it the state dict we
  loaded and checked instead, so the network is pytorch-fid's, module for module.
- IS logits come from torch-fidelity's ``FeatureExtractorInceptionV3`` (``logits_unbiased``: the
  1008-way fc layer without its bias), loaded from the same file; so do KID's and precision/recall's
  features (its ``2048`` pool features, torch-fidelity's default layer for both), from the same forward
  pass when both are asked.

FID protocols (recorded in ``metrics.json`` with the text below):
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from synthmill.errors import SpecError, first_line
from synthmill.metrics.base import Network

PROTOCOLS = {
    "pytorch-fid": "pixels/255 as float32, torch bilinear resize to 299x299 (align_corners=False), "
                   "scaled to [-1, 1] as 2x-1 (pytorch-fid's InceptionV3 with resize_input and normalize_input)",
    "clean": "each channel as a float32 PIL image, PIL bicubic resize to 299x299, clipped to [0, 255], "
             "scaled as (x-128)/128 like the TF graph (clean-fid's 'clean' mode)",
}
IS_CONVENTION = ("torch-fidelity: uint8 pixels, TF1-compatible bilinear resize to 299x299, (x-128)/128, "
                 "unbiased logits (fc without bias, 1008 classes), softmax, samples shuffled with "
                 "numpy RandomState(seed), split into equal parts")
RESIZE_TO = "PIL bicubic resize of the 8-bit RGB image to resize_to x resize_to before everything else"

__doc__ += "\n".join(f"\n- ``{k}``: {v}." for k, v in PROTOCOLS.items())

#: The feature name of torch-fidelity's 2048 pool features (KID, precision/recall) in the metrics table.
FIDELITY_POOL = "fidelity_pool"

_build_lock = threading.Lock()


def pytorch_fid_network(state_dict: dict[str, Any], protocol: str):
    """pytorch-fid's pool3 network with ``state_dict`` loaded; resizes and normalises for ``pytorch-fid``."""
    from pytorch_fid import inception as pfi

    own = protocol == "pytorch-fid"
    with _build_lock:  # the swap below is module state
        fetch = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=own, normalize_input=own)
        finally:
            pfi.load_state_dict_from_url = fetch
    return net.eval().requires_grad_(False)


def torch_fidelity_logits_network(weights_path: str, features: tuple[str, ...] = ("logits_unbiased",)):
    """torch-fidelity's extractor of ``features`` (unbiased logits; ``2048``: pool features), from ``weights_path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                       feature_extractor_weights_path=weights_path)


def _clean_resize(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    out = np.empty((299, 299, 3), np.float32)
    for c in range(3):
        ch = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
        out[:, :, c] = np.asarray(ch.resize((299, 299), resample=Image.BICUBIC))
    return np.clip(out, 0, 255)


class InceptionExtractor:
    """FID features, IS logits and/or torch-fidelity's pool features (KID, precision/recall) of batches of 8-bit
    RGB images (HxWx3 numpy arrays)."""

    def __init__(self, state_dict: dict[str, Any], weights_path: str, protocol: str, fid: bool, isc: bool,
                 device: str = "cpu", fidelity_pool: bool = False):
        import torch

        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown FID protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
        # TF32 would change features in the 4th digit on Ampere and later GPUs.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.protocol, self.device = protocol, device
        self.fid_net = pytorch_fid_network(state_dict, protocol).to(device) if fid else None
        self.fidelity = (("logits_unbiased",) if isc else ()) + (("2048",) if fidelity_pool else ())
        self.is_net = torch_fidelity_logits_network(weights_path, self.fidelity).to(device) if self.fidelity else None

    def _fid_input(self, images: list[np.ndarray]):
        import torch

        if self.protocol == "pytorch-fid":  # what torchvision's ToTensor gives pytorch-fid
            return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(torch.float32).div(255)
        x = np.stack([_clean_resize(im) for im in images])
        return (torch.from_numpy(x).permute(0, 3, 1, 2) - 128) / 128

    def fid_features(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, 2048) float32 pool3 features."""
        import torch

        with torch.inference_mode():
            out = self.fid_net(self._fid_input(images).to(self.device))[0]
        return out.squeeze(3).squeeze(2).cpu().numpy()

    def fidelity_features(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """torch-fidelity's features of one forward pass: ``logits_unbiased`` (B, 1008) and/or ``2048`` (B, 2048),
        float32, as the extractor was built."""
        import torch

        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.inference_mode():
            out = self.is_net(x)
        return {name: t.cpu().numpy() for name, t in zip(self.fidelity, out, strict=True)}

    def is_logits(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, 1008) float32 unbiased logits."""
        return self.fidelity_features(images)["logits_unbiased"]


def inception_score(logits: np.ndarray, splits: int, seed: int, shuffle: bool = True) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` parts: torch-fidelity's own function."""
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.ascontiguousarray(logits)), splits=splits,
                                 shuffle=shuffle, rng_seed=seed)
    return float(out["inception_score_mean"]), float(out["inception_score_std"])


def check_fid_inception(state: dict[str, Any], path: str) -> None:
    """WeightsError unless ``state`` fits pytorch-fid's FID Inception network, key for key and shape for
    shape (the network is built on the meta device: no memory, no initialisation)."""
    import warnings

    import torch

    from synthmill.metrics.weights import WeightsError

    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"{path}: entry {bad!r} is not a named tensor; not the weights of the FID Inception network")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op", once a tensor
            pytorch_fid_network(state, "pytorch-fid")
    except RuntimeError as e:  # load_state_dict: "Error(s) in loading ...:\n\tMissing key(s) ...: ..."
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()] or [first_line(e)]
        raise WeightsError(f"{path}: not the weights of the FID Inception network ({lines[0][:200]})") from None


class _Net:
    """The Inception networks as the scorer runs them: pool3 features and/or IS logits of a batch."""

    def __init__(self, spec: Any, info: dict[str, Any], features: tuple[str, ...], device: str):
        from synthmill.metrics import weights

        # Resolved on this node: a URL is downloaded into this node's cache (once, under a lock).
        path, _ = weights.resolve(info["weights"], info["sha256"], spec.storage)
        self.extractor = InceptionExtractor(weights.load_state_dict(path), path, spec.fid.protocol,
                                            "pool3" in features, "logits" in features, device,
                                            fidelity_pool=FIDELITY_POOL in features)

    def extract(self, features: tuple[str, ...], images: list[np.ndarray], captions: list[Any]) -> dict[str, Any]:
        out = {}
        if "pool3" in features:
            out["pool3"] = self.extractor.fid_features(images)
        if "logits" in features or FIDELITY_POOL in features:
            fidelity = self.extractor.fidelity_features(images)
            if "logits" in features:
                out["logits"] = fidelity["logits_unbiased"]
            if FIDELITY_POOL in features:
                out[FIDELITY_POOL] = fidelity["2048"]
        return out


def _check(spec: Any, opts: dict[str, Any] | None) -> dict[str, Any]:
    """The weights file (a URL is downloaded and hashed once here), checked to be the FID Inception network's."""
    from synthmill.metrics import weights

    try:
        path, sha = weights.resolve(spec.fid.weights, spec.fid.weights_sha256, opts)
        check_fid_inception(weights.load_state_dict(path), path)
    except weights.WeightsError as e:
        raise SpecError(f"fid.weights: {e}") from None
    return {"weights": spec.fid.weights, "sha256": sha, "path": path}


def _prepare(spec: Any, image: Any) -> np.ndarray:
    """8-bit RGB pixels, first resized to ``fid.resize_to`` squared (PIL bicubic) when it is set."""
    from PIL import Image

    r = spec.fid.resize_to
    return np.asarray(image.resize((r, r), resample=Image.BICUBIC) if r else image, dtype=np.uint8)


NETWORK = Network("inception", load=_Net, prepare=_prepare, check=_check,
                  same_size=lambda spec: spec.fid.resize_to is None)
