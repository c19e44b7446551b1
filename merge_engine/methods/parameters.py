"""The one table of merge-method parameters: name → what it means.

The proto translation (`server/translate.py`), the CLI (`loramerge methods`) and the docs read
this table; a unit test keeps it equal to the union of the methods' parameter dataclasses and to
the fields of the proto's `MergeParameters`.
"""

from __future__ import annotations

from types import MappingProxyType

PARAMETERS = MappingProxyType(
    {
        "scaling": "λ, the rule's scaling coefficient; task weights are λ · N · ρ_t with N the "
        "number of merged adapters (ρ_t > 0)",
        "density": "TIES-style rules: share of entries kept per task, in (0, 1]",
        "drop_rate": "DARE-style rules: probability of dropping an entry, in [0, 1)",
        "majority_sign": "TIES sign election: total (sign of the weighted sum) or frequency",
        "seed": "seed of DARE's random drops; the same seed gives the same merge",
        "inner": "core: the rule applied in the core space (ta, ties, tsvm, dare_linear, "
        "dare_ties)",
        "branch_rank": "svd_cur: SVD components and CUR columns kept per branch",
        "mix": "svd_cur: weight α of the SVD branch; unset in a request means the default, "
        "and None (Python/YAML null) means eq. 33's residual rule",
        "off_diagonal": "regmean: weight α of the input Gram matrices' off-diagonal entries, in "
        "[0, 1] (1: plain RegMean, 0: each input feature on its own)",
    }
)
