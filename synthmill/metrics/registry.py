"""The tables of evaluate: every network, feature and metric synthmill scores with (shapes in ``base``).

The scorer actor and the evaluate driver know no metric by name: they loop over these tables. A new metric
is one module (its :class:`~synthmill.metrics.base.Metric`, and the feature and network it needs when they
are new) plus its rows here.
"""

from __future__ import annotations

from synthmill.metrics import clip, cmmd, fid, hps, imagereward, inception, isc, kid, pickscore
from synthmill.metrics.base import Feature, Metric, Network

NETWORKS: dict[str, Network] = {n.name: n for n in (
    inception.NETWORK,
    clip.NETWORK,
    cmmd.NETWORK,
    hps.NETWORK,
    imagereward.NETWORK,
    pickscore.NETWORK,
)}

FEATURES: dict[str, Feature] = {f.name: f for f in (
    fid.POOL3,
    isc.LOGITS,
    kid.POOL,
    clip.COSINE,
    cmmd.EMBEDDING,
    hps.SCORES,
    imagereward.SCORES,
    pickscore.SCORES,
)}

#: In this order their entries appear in metrics.json (and in messages that list the known metrics).
METRICS: dict[str, Metric] = {m.name: m for m in (
    fid.FID,
    kid.KID,
    kid.PRECISION_RECALL,
    cmmd.CMMD,
    isc.IS,
    clip.CLIP,
    hps.HPSV2,
    imagereward.IMAGE_REWARD,
    pickscore.PICKSCORE,
    fid.FID_STATS_ONLY,
)}


def features_of(metrics: list[str], set_name: str) -> tuple[str, ...]:
    """The features ``metrics`` need of the set ``set_name``, each once, in table order."""
    wanted = {f for m in metrics for f in METRICS[m].features.get(set_name, ())}
    return tuple(f for f in FEATURES if f in wanted)


def networks_of(features: tuple[str, ...]) -> tuple[str, ...]:
    """The networks that give ``features``, each once, in table order."""
    wanted = {FEATURES[f].network for f in features}
    return tuple(n for n in NETWORKS if n in wanted)
