"""The adapter algorithms, one class each, and reading one module's tensors from a file."""

from __future__ import annotations

import torch

from .base import Adapter, column_norm, dora_weight, tucker
from .glora import GLoRA
from .loha import LoHa
from .lokr import LoKr, without_tucker
from .lora import DyLoRA, LoRA
from .oft import BOFT, OFT

ALGORITHMS: dict[str, type[Adapter]] = {"lora": LoRA, "loha": LoHa, "lokr": LoKr, "dylora": DyLoRA, "oft": OFT,
                                         "boft": BOFT, "glora": GLoRA}
READERS: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, OFT, BOFT, GLoRA)
# The zero-initialised ("B") parameters, by the names each algorithm declares (Adapter.plus_params); LoRA+ speeds them up.
PLUS_PARAMS = frozenset(name for cls in (*ALGORITHMS.values(), *READERS) for name in cls.plus_params)


def adapter_from_factors(tensors: dict[str, torch.Tensor], shape=None) -> Adapter | None:
    """The adapter stored in one module's tensors (any algorithm we read), or None.

    Raises ValueError for factors that do not fit together. LyCORIS Tucker factors (lora_mid,
    hada_t1/t2, lokr_t2) are read by the LoRA, LoHa and LoKr classes themselves.
    """
    for cls in READERS:
        adapter = cls.from_factors(tensors, shape)
        if adapter is not None:
            return adapter
    return None


__all__ = [
    "ALGORITHMS", "BOFT", "GLoRA", "OFT", "PLUS_PARAMS", "Adapter", "DyLoRA", "LoHa", "LoKr", "LoRA",
    "adapter_from_factors", "column_norm", "dora_weight", "tucker",
    "without_tucker",
]
