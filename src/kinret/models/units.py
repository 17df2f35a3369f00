"""A backbone whose feature pass is a chain of units, so its first units can be frozen and their output cached: the
interface the face networks (`OnnxBackbone`, `IResNet`) implement. A config's `freeze_units` is the cut, a unit
count used as is: the first `cut` units are frozen, their output is what a cached prefix holds, and
``forward_rest(forward_prefix(x, cut), cut) == forward_features(x)`` for every cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from kinret.errors import KinretInputError


class UnitChain(nn.Module):
    """A backbone written as a chain of units (see the module docstring). Subclasses give `chain_units` (the units'
    modules, in order) and `forward_prefix`/`forward_rest`; the rest is shared."""

    def chain_units(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def forward_prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """The output of the first `cut` units on the kit's input."""
        raise NotImplementedError

    def forward_rest(self, h: torch.Tensor, cut: int) -> torch.Tensor:
        """The units after `cut` (and what ends the feature pass) on the output of the first `cut`."""
        raise NotImplementedError

    @property
    def n_units(self) -> int:
        return len(self.chain_units())

    def check_cut(self, cut: int, who: str = "") -> int:
        """`cut` when the chain has that many units, else a KinretInputError naming `who`."""
        if not 0 <= cut <= self.n_units:
            raise KinretInputError(None, f"{who or 'the backbone'}: cannot cut after {cut} units; its chain has "
                                         f"{self.n_units}")
        return cut

    def freeze_units(self, cut: int) -> None:
        """Keep the parameters of the first `cut` units out of training."""
        for unit in self.chain_units()[:self.check_cut(cut)]:
            unit.requires_grad_(False)

    def units_digest(self, cut: int) -> str:
        """A content hash of the first `cut` units' weights and buffers: equal for a network and any model
        fine-tuned from it with those units frozen, so both read the same cached prefix."""
        h = hashlib.sha256(f"cut{cut}".encode())
        for k, unit in enumerate(self.chain_units()[:self.check_cut(cut)]):
            for name, value in sorted(unit.state_dict().items()):
                h.update(f"{k}.{name}".encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class NativeEmbedding:
    """A backbone with its own embedding layer after the feature map (the face networks' "native" pooling):
    `forward_native` maps the feature map to it, `native_features` is its width."""

    native_features: int

    def forward_native(self, fmap: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
