"""The shard plan: which samples, prompts, keys and seeds belong to shard k
(docs/design.md invariants 1, 2).

Sample ``i = prompt_index * images_per_prompt + image_index`` has key ``f"{i:010d}"`` and seed
``seed + i``; shard ``k`` holds samples ``[k*S, min((k+1)*S, N))``. Everything here is arithmetic on
counts: the plan never holds prompts.
"""

from __future__ import annotations

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

    @property
    def num_samples(self) -> int:
        return self.num_prompts * self.images_per_prompt

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def samples(self, k: int) -> range:
        """Sample indices of shard ``k``."""
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} is outside the plan (0..{self.num_shards - 1})")
        return range(k * self.samples_per_shard, min((k + 1) * self.samples_per_shard, self.num_samples))

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
    if samples is not None and per is not None and n != -(-samples // per):
        return f'"shards" is {n:,}, but {samples:,} samples at {per:,} a shard are {-(-samples // per):,} shards'
    if samples is not None and n > samples:
        return f'"shards" is {n:,}, more than its {samples:,} samples'
    if samples is not None and prompts is not None and samples % prompts:
        return f'"samples" is {samples:,}, not a whole number of images for each of its {prompts:,} prompts'
    return None
