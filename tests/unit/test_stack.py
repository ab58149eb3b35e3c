"""LocalStack: many clients' local adapters applied per row in one pass (serving)."""

from __future__ import annotations

import pytest
import torch
from test_adapters import lora_config, out, randomize, tiny_bert

from feddpa.core.adapters import (
    LOCAL,
    Mix,
    attach_dual_adapters,
    fresh_adapter_state,
    load_adapter_state,
    mixed,
)
from feddpa.serving.stack import LocalStack, StackRoute


def client_state(model, seed: int) -> dict[str, torch.Tensor]:
    """A local adapter with non-zero A and B (fresh ones have B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * 0.2
        for k, v in fresh_adapter_state(model, seed).items()
    }


@pytest.fixture
def served():
    model = attach_dual_adapters(tiny_bert(), lora_config())
    randomize(model)
    model.eval()
    return model


def test_per_row_clients_equal_per_client_peft_runs(served):
    states = [client_state(served, seed) for seed in (11, 12, 13)]
    stack = LocalStack(served, slots=2)  # three clients: the stack grows
    slots = [stack.put(s) for s in states]
    assert stack.capacity == 4 and sorted(slots) == [0, 1, 2]
    ids = torch.randint(0, 50, (5, 7), generator=torch.Generator().manual_seed(3))
    owner = torch.tensor([2, 0, 1, 0, -1])  # the last row has no local adapter
    wg = torch.tensor([0.3, 0.9, 0.5, 0.1, 1.0])
    wl = torch.tensor([0.7, 0.1, 0.5, 0.9, 0.0])
    row_slots = torch.tensor([slots[o] if o >= 0 else -1 for o in owner.tolist()])
    with torch.no_grad(), mixed(served, Mix(wg, wl), StackRoute(stack, row_slots)):
        batched = out(served, ids)
    for i, o in enumerate(owner.tolist()):
        load_adapter_state(served, LOCAL, states[o] if o >= 0 else states[0])
        with torch.no_grad(), mixed(served, Mix(float(wg[i]), float(wl[i]))):
            single = out(served, ids[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


def test_stack_path_ignores_the_peft_local_adapter(served):
    stack = LocalStack(served)
    slot = stack.put(client_state(served, 21))
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    with (
        torch.no_grad(),
        mixed(served, Mix(1.0, 0.0), StackRoute(stack, torch.tensor([slot, slot]))),
    ):
        got = out(served, ids)
    with torch.no_grad(), mixed(served, Mix(1.0, 0.0)):
        expected = out(served, ids)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not stack.layers[0]._forward_hooks  # hooks removed after the block


def test_release_zeroes_and_reuses_the_slot(served):
    stack = LocalStack(served, slots=2)
    a = stack.put(client_state(served, 1))
    b = stack.put(client_state(served, 2))
    stack.release(a)
    assert all(not t[a].any() for t in (*stack.A, *stack.B))
    assert stack.put(client_state(served, 3)) == a and b != a


def test_put_rejects_a_state_of_another_model(served):
    stack = LocalStack(served)
    state = client_state(served, 1)
    key = next(iter(state))
    with pytest.raises(KeyError, match="client_7"):
        stack.put({k: v for k, v in state.items() if k != key}, owner="client_7")
    with pytest.raises(KeyError, match="shape"):
        stack.put({**state, key: torch.zeros(3, 3)}, owner="client_7")
    assert len(stack.free) == stack.capacity  # nothing was taken
