"""toyrlhf: exact RLHF, DPO and PPO theory on small enumerable token trees.

Every completion of a tiny language model is enumerated, so objectives, projections and
gradients are computed exactly (no sampling noise), and every lecture figure is regenerated
bit-for-bit with ``toyrlhf figures``.

This module imports nothing heavy; plotting lives in :mod:`toyrlhf.plotting`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
