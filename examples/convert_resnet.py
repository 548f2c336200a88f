"""Convert a torchvision ResNet into a reversible network in one call and print what changed.

Run: python examples/convert_resnet.py            (REVCONVERT_EXAMPLE_TINY=1 for a quick check)
"""

from __future__ import annotations

import os

import torch
import torchvision

import revconvert

TINY = os.environ.get("REVCONVERT_EXAMPLE_TINY") == "1"

# weights=None keeps the example offline; pretrained weights load into the stored parts the same way.
model = torchvision.models.resnet18() if TINY else torchvision.models.resnet50()

# The one call: stride-1 identity blocks become reversible couplings, the rest stays as it was.
converted = revconvert.convert(model)
print(converted.revconvert_summary)

# The converted model is a drop-in replacement: same input, same output shape.
size = 64 if TINY else 224
x = torch.randn(2, 3, size, size)
converted(x).sum().backward()  # its reversible segments recompute activations in this backward
print(f"\noutput shape {tuple(converted(x).shape)}, same as the original's {tuple(model(x).shape)}")
