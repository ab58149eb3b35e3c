"""The adapter wire format between client actors and the driver (no Ray cluster needed)."""

import numpy as np
import pytest
import torch

from feddpa.actors.ray_actor import from_wire, to_wire
from feddpa.core.fedavg import FlatState


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_wire_round_trip_is_exact(dtype):
    gen = torch.Generator().manual_seed(0)
    state = {
        "b.lora_B.weight": torch.randn(6, 2, generator=gen).to(dtype),
        "a.lora_A.weight": torch.randn(2, 6, generator=gen).to(dtype),
    }
    wire = to_wire(state)
    assert isinstance(wire.data, np.ndarray) and wire.data.ndim == 1  # one buffer
    back = from_wire(wire)
    assert isinstance(back, FlatState)
    for key, value in back.state().items():
        assert value.dtype == dtype
        assert torch.equal(value, state[key])


def test_from_wire_copies_read_only_buffers():
    wire = to_wire({"w": torch.ones(4)})
    wire.data.setflags(write=False)  # as Ray hands out object-store buffers
    flat = from_wire(wire)
    flat.data.add_(1)  # writable, and the original buffer is untouched
    assert wire.data.tolist() == [1.0] * 4
