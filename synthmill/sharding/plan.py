"""The shard plan: which samples, prompts, keys and seeds belong to shard k
(docs/design.md invariants 1, 2).

Sample ``i = prompt_index * images_per_prompt + image_index`` has key ``f"{i:010d}"`` and seed
``seed + i``; shard ``k`` holds samples ``[k*S, min((k+1)*S, N))``. Everything here is arithmetic on
counts: the plan never holds prompts.

A plan that grew (rows appended to the prompts after a run) is a sequence of parts: part ``g`` covers the
prompts an earlier run ended with up to the next one's end, and its shards follow the shards of the parts
before it, each ``S`` samples but its last. A committed shard is therefore never rewritten: the rows
appended make new shards after the old last one, even when that one is short.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

#: Most shards in one job: each is a tar, an index part and a marker, and the driver tracks each.
MAX_SHARDS = 10_000_000


def sample_key(i: int) -> str:
    """The WebDataset key of sample ``i`` (never derived from prompt text)."""
    return f"{i:010d}"


def shard_name(k: int) -> str:
    """The file stem of shard ``k``: ``000000`` ... (tar, marker and index part share it)."""
    return f"{k:06d}"


@dataclass(frozen=True)
class ShardPlan:
    num_prompts: int
    images_per_prompt: int
    samples_per_shard: int
    seed: int
    #: the prompt counts earlier runs ended with, ascending, each below ``num_prompts`` (empty: never grew)
    grown_from: tuple[int, ...] = ()

    @property
    def part_ends(self) -> tuple[int, ...]:
        """Prompt count at the end of each part (the last is ``num_prompts``)."""
        return (*self.grown_from, self.num_prompts)

    @property
    def part_shards(self) -> tuple[int, ...]:
        """Shard count at the end of each part."""
        out, k, start = [], 0, 0
        for end in self.part_ends:
            k += -(-(end - start) * self.images_per_prompt // self.samples_per_shard)
            out.append(k)
            start = end
        return tuple(out)

    @property
    def num_samples(self) -> int:
        return self.num_prompts * self.images_per_prompt

    @property
    def num_shards(self) -> int:
        return self.part_shards[-1]

    def part_of(self, k: int) -> int:
        """The part that shard ``k`` belongs to."""
        return bisect_right(self.part_shards, k)

    def samples(self, k: int) -> range:
        """Sample indices of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} is outside the plan (0..{self.num_shards - 1})")
        g = self.part_of(k)
        first_shard = self.part_shards[g - 1] if g else 0
        first = (self.part_ends[g - 1] if g else 0) * self.images_per_prompt
        stop = self.part_ends[g] * self.images_per_prompt
        lo = first + (k - first_shard) * self.samples_per_shard
        return range(lo, min(lo + self.samples_per_shard, stop))

    def prompts(self, k: int) -> range:
        """Prompt rows that shard ``k`` needs."""
        s = self.samples(k)
        return range(s.start // self.images_per_prompt, (s.stop - 1) // self.images_per_prompt + 1)

    def split(self, i: int) -> tuple[int, int]:
        """(prompt_index, image_index) of sample ``i``."""
        return divmod(i, self.images_per_prompt)

    def seed_of(self, i: int) -> int:
        return self.seed + i

    def rows_per_shard(self) -> int:
        """A stride for the prompt source's offset table: at most one shard's rows apart."""
        return max(1, self.samples_per_shard // self.images_per_prompt)


def count(value: Any) -> bool:
    """Whether ``value`` (from a JSON or YAML file) is a positive whole number."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def earlier_parts(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of a generate job's ``plan.json`` that earlier runs ended with (``grown_from``; empty when the
    prompts never grew), each ``{"prompts", "shards", "prompts_digest", "fingerprint"}``, its counts cumulative."""
    parts = plan.get("grown_from")
    return parts if isinstance(parts, list) else []


def shard_fingerprint(plan: dict[str, Any]):
    """``k -> the fingerprint shard k's marker holds``, for the ``plan.json`` of a generate job: a shard made
    before the prompts grew holds the fingerprint of its part's rows."""
    ends = [p.get("shards") for p in earlier_parts(plan)]
    prints = [p.get("fingerprint") for p in earlier_parts(plan)] + [plan.get("fingerprint")]
    if not all(count(e) for e in ends):
        return lambda k: plan.get("fingerprint")
    return lambda k: prints[bisect_right(ends, k)]


def plan_problem(plan: dict[str, Any]) -> str | None:
    """What is wrong with the counts of a generate job's ``plan.json``, or None.

    Its readers (``synthmill status``, an evaluate or distill job reading the output) go over every shard it
    names, so an edited count must not send them over a trillion shards, nor print "0 / -1 done": ``shards``
    must be a whole number in 1..:data:`MAX_SHARDS` and agree with ``samples`` and ``samples_per_shard``, and
    ``samples`` with ``prompts``, where the plan has them (the first versions wrote fewer keys).
    """
    n = plan.get("shards")
    if not count(n):
        return f'"shards" is {n!r}, not a positive whole number'
    if n > MAX_SHARDS:
        return f'"shards" is {n:,}, more than a job holds ({MAX_SHARDS:,})'
    for key in ("samples", "samples_per_shard", "prompts"):
        if key in plan and not count(plan[key]):
            return f'"{key}" is {plan[key]!r}, not a positive whole number'
    samples, per, prompts = plan.get("samples"), plan.get("samples_per_shard"), plan.get("prompts")
    if samples is not None and prompts is not None and samples % prompts:
        return f'"samples" is {samples:,}, not a whole number of images for each of its {prompts:,} prompts'
    parts = earlier_parts(plan)
    if "grown_from" in plan:
        if not parts or not all(isinstance(p, dict) and count(p.get("prompts")) and count(p.get("shards"))
                                for p in parts):
            return '"grown_from" is not a list of parts with positive "prompts" and "shards"'
        ends = [p["prompts"] for p in parts] + [prompts]
        shard_ends = [p["shards"] for p in parts] + [n]
        if prompts is None or samples is None or per is None or any(a >= b for a, b in zip(ends, ends[1:],
                                                                                               strict=False)):
            return '"grown_from" parts do not end in ascending prompt counts below "prompts"'
        ipp = samples // prompts
        grown = ShardPlan(prompts, ipp, per, 0, tuple(ends[:-1]))
        if list(grown.part_shards) != shard_ends:
            return f'"grown_from" shard counts {shard_ends} are not those of its parts ({list(grown.part_shards)})'
    elif samples is not None and per is not None and n != -(-samples // per):
        return f'"shards" is {n:,}, but {samples:,} samples at {per:,} a shard are {-(-samples // per):,} shards'
    if samples is not None and n > samples:
        return f'"shards" is {n:,}, more than its {samples:,} samples'
    return None
