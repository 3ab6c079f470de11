"""Who seeds which random stream of a run (arXiv 2403.15837's masks must be independent across processes).

- Model initialisation and the data order: ``seed``, the same on every process (``set_seed`` before the model is
  built; the sampler and the stream shuffle take ``seed`` explicitly), so processes start alike and shard one
  permutation of the data.
- Patch masks in training: the global torch RNG, re-seeded per process with ``derive_seed(seed, "masks", rank)``
  once the model exists, so every process draws its own masks; its state is checkpointed per process.
- Augmentation: a function of ``(seed, epoch, row index)`` in the collator, whichever worker builds the batch.
- Masked inference in evaluation: a ``torch.Generator`` re-seeded for every batch with
  ``derive_seed(seed, "eval-masks", draw, first row of the batch)``, whatever the number of processes.
"""

from __future__ import annotations

import hashlib

from accelerate.utils import set_seed


def derive_seed(*parts: object) -> int:
    """A 32-bit seed (NumPy's limit) that depends on every part: unlike ``seed + rank``, the streams of run
    ``seed=1`` do not repeat those of run ``seed=0`` one rank over."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_mask_stream(seed: int, process_index: int) -> None:
    """Seed this process's global RNGs (torch CPU and CUDA, Python, NumPy) for its own patch masks."""
    set_seed(derive_seed(seed, "masks", process_index))
