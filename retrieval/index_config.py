"""What an index is built as: `IndexConfig` and the corpus-size rules of `kind="auto"`.

`IndexConfig` mirrors `config.index` (configs/common.py) field for field;
`IndexConfig.from_config(config.index)` rejects unknown keys up front. `plan_scann`
turns a config and a corpus size into the concrete ScaNN layout, so what was built is
explicit (it is saved beside the index and logged).
"""

import dataclasses
import math
from collections.abc import Mapping

KINDS = ("auto", "exact", "scann")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """Every knob of the indexes; -1 means "derive from the corpus size"."""

    kind: str = "auto"  # "auto" (ScaNN if importable, else exact) | "exact" | "scann".
    # ScaNN layout by corpus size n: brute force below `brute_force_below`; asymmetric
    # hashing (AH) + exact reorder below `tree_min_size`; tree + AH + reorder above.
    brute_force_below: int = 2_000
    tree_min_size: int = 20_000
    num_leaves: int = -1  # Tree partitions; -1: round(sqrt(n)).
    leaves_to_search: int = -1  # Partitions scored per query; -1: leaves_fraction of them.
    # 0.3: recall@10 0.95+ for real WordNet questions over the 117k KB's MiniLM vectors
    # (0.08 gave 0.905: questions sit farther from passages than passages from each other).
    leaves_fraction: float = 0.3
    # Training samples: ScaNN's 100k each made a 117k x 384 build 2.4x slower (120 s vs
    # 50 s on 2 shared cores) for no recall change (launch/benchmark_index.py).
    tree_training_sample: int = 50_000  # Vectors the k-means tree is trained on.
    reorder: int = 100  # AH candidates rescored exactly; searches use max(reorder, k).
    ah_dims_per_block: int = 2  # Dimensions per 4-bit AH code (lut16).
    ah_training_sample: int = 30_000  # Vectors the AH codebooks are trained on.
    anisotropic_threshold: float = 0.2  # Score-aware (anisotropic) AH loss; nan: plain.
    spherical: bool = False  # Spherical k-means for the tree.
    num_neighbors: int = 10  # Default k the searcher is built for (search may ask more).
    num_threads: int = 0  # Search threads; 0: all CPUs.
    training_threads: int = 0  # Build threads; 0: all CPUs.
    recall_queries: int = 200  # Queries sampled to measure recall@k at build; 0: skip.
    recall_k: int = 10
    exact_block_size: int = 16_384  # Exact search: corpus rows scored per block.
    seed: int = 0  # Recall query sample.

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {KINDS}")
        if self.num_neighbors < 1 or self.recall_k < 1 or self.exact_block_size < 1:
            raise ValueError(
                "index num_neighbors, recall_k and exact_block_size must be >= 1, got "
                f"{self.num_neighbors}, {self.recall_k}, {self.exact_block_size}")
        if not 0.0 < self.leaves_fraction <= 1.0:
            raise ValueError(f"index leaves_fraction must be in (0, 1], got "
                             f"{self.leaves_fraction}")

    @classmethod
    def from_config(cls, cfg: Mapping | None = None, **overrides) -> "IndexConfig":
        """From `config.index` (a ConfigDict or dict); unknown keys fail, naming them."""
        values = dict(cfg or {})
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown index config keys {unknown}; accepted: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_scann(config: IndexConfig, n: int) -> dict:
    """The ScaNN layout for `n` vectors: {"mode": "brute_force" | "ah" | "tree_ah", ...}."""
    if n < config.brute_force_below:
        return dict(mode="brute_force")
    plan = dict(mode="ah", reorder=config.reorder, ah_dims_per_block=config.ah_dims_per_block,
                anisotropic_threshold=config.anisotropic_threshold,
                ah_training_sample=min(config.ah_training_sample, n))
    if n < config.tree_min_size:
        return plan
    num_leaves = config.num_leaves if config.num_leaves > 0 else max(2, round(math.sqrt(n)))
    num_leaves = min(num_leaves, n)
    to_search = config.leaves_to_search
    if to_search <= 0:
        to_search = math.ceil(config.leaves_fraction * num_leaves)
    plan.update(mode="tree_ah", num_leaves=num_leaves,
                leaves_to_search=max(1, min(to_search, num_leaves)),
                training_sample=min(config.tree_training_sample, n),
                spherical=config.spherical)
    return plan
