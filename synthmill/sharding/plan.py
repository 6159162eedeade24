"""The shard plan: which samples, prompts, keys and seeds belong to shard k
(docs/design.md invariants 1, 2).

Sample ``i = prompt_index * images_per_prompt + image_index`` has key ``f"{i:010d}"`` and seed
``seed + i``; shard ``k`` holds samples ``[k*S, min((k+1)*S, N))``. Everything here is arithmetic on
counts: the plan never holds prompts.
"""

from __future__ import annotations

from dataclasses import dataclass


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
