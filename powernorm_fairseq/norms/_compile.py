"""The stateful norms' forward as a ``torch.compile`` graph break.

Imported only while ``torch.compile`` traces (see ``MaskedNorm.forward``): ``torch.compiler.disable``
imports ``torch._dynamo``, about 2 s that no eager run should pay.
"""

from __future__ import annotations

import torch


@torch.compiler.disable
def forward_eagerly(norm, x, padding_mask):
    """``norm._forward_stateful(x, padding_mask)``, run outside the traced graph."""
    return norm._forward_stateful(x, padding_mask)
