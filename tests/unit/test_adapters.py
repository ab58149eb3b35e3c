"""Dual LoRA adapters on stock peft: the mix math, per-row mixing, stop-grad training, state I/O."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import BertConfig, BertModel

from feddpa.core.adapters import (
    GLOBAL,
    LOCAL,
    Mix,
    adapter_state,
    attach_dual_adapters,
    fresh_adapter_state,
    load_adapter_state,
    lora_layers,
    mixed,
    set_trainable,
    training,
)
from feddpa.core.storage import load_adapter, save_adapter

HIDDEN = 32
VOCAB = 50
R, ALPHA = 4, 8
SCALE = ALPHA / R


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def lora_config() -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query", "value"])


def randomize(model: PeftModel, seed: int = 1) -> None:
    """Non-zero random A and B for both adapters, so every path contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: extra OpenMP threads only spin on this shared 2-core box (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base() -> BertModel:
    return tiny_bert()


@pytest.fixture
def model(base: BertModel) -> PeftModel:
    peft_model = attach_dual_adapters(copy.deepcopy(base), lora_config())
    randomize(peft_model)
    return peft_model.eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (4, 7), generator=torch.Generator().manual_seed(2))


def out(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).last_hidden_state


def only_adapter(model: PeftModel, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Output with peft's own single-adapter activation (plain scalings)."""
    model.base_model.set_adapter([name])
    try:
        return out(model, ids)
    finally:
        model.base_model.set_adapter([GLOBAL, LOCAL])
        set_trainable(model, None)


def lora_params(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {
        k: p.detach().clone()
        for k, p in model.named_parameters()
        if "lora_" in k and f".{name}." in k
    }


# --- the mix -------------------------------------------------------------------------------------


def test_global_mix_equals_global_adapter_alone(model, ids):
    expected = only_adapter(model, ids, GLOBAL)
    with mixed(model, Mix(1.0, 0.0)):
        got = out(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_local_mix_equals_local_adapter_alone(model, ids):
    expected = only_adapter(model, ids, LOCAL)
    with mixed(model, Mix(0.0, 1.0)):
        got = out(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mix_differs_from_single_adapters(model, ids):
    with mixed(model, Mix(0.5, 0.5)):
        half = out(model, ids)
    assert not torch.allclose(half, only_adapter(model, ids, GLOBAL), atol=1e-4)
    assert not torch.allclose(half, only_adapter(model, ids, LOCAL), atol=1e-4)


@pytest.mark.parametrize("wg,wl", [(1.0, 0.0), (0.0, 1.0), (0.3, 0.7), (0.5, 0.25)])
def test_one_layer_matches_the_formula(model, wg, wl):
    """h = W0·x + s·[w_g·B_g A_g x + w_l·B_l A_l x] on the first adapted layer."""
    layer = next(lora_layers(model))
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(3))
    a_g, b_g = layer.lora_A[GLOBAL].weight, layer.lora_B[GLOBAL].weight
    a_l, b_l = layer.lora_A[LOCAL].weight, layer.lora_B[LOCAL].weight
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + SCALE * (
            wg * x @ a_g.T @ b_g.T + wl * x @ a_l.T @ b_l.T
        )
        with mixed(model, Mix(wg, wl)):
            got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mixed_restores_plain_scalings(model):
    with mixed(model, Mix(torch.tensor([0.2, 0.4]), 0.1)):
        pass
    for layer in lora_layers(model):
        assert layer.scaling == {GLOBAL: SCALE, LOCAL: SCALE}


def test_mixed_restores_scalings_after_an_error(model):
    with pytest.raises(RuntimeError), mixed(model, Mix(0.2, 0.8)):
        raise RuntimeError("boom")
    for layer in lora_layers(model):
        assert layer.scaling == {GLOBAL: SCALE, LOCAL: SCALE}


def test_fresh_adapters_equal_the_base_model(model, ids):
    load_adapter_state(model, GLOBAL, fresh_adapter_state(model, seed=5))
    load_adapter_state(model, LOCAL, fresh_adapter_state(model, seed=6))
    with model.disable_adapter():
        expected = out(model, ids)
    for mix in (Mix(1.0, 0.0), Mix(0.0, 1.0), Mix(0.4, 0.6)):
        with mixed(model, mix):
            torch.testing.assert_close(out(model, ids), expected, atol=1e-6, rtol=0)


def test_per_row_mix_equals_per_example_runs(model, ids):
    wg = torch.tensor([1.0, 0.0, 0.3, 0.8])
    wl = torch.tensor([0.0, 1.0, 0.7, 0.5])
    with mixed(model, Mix(wg, wl)):
        batched = out(model, ids)
    for i in range(len(ids)):
        with mixed(model, Mix(float(wg[i]), float(wl[i]))):
            single = out(model, ids[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)
    # rows really differ by their weights, not just by their inputs
    with mixed(model, Mix(float(wg[2]), float(wl[2]))):
        same_weights = out(model, ids)
    assert not torch.allclose(batched[0], same_weights[0], atol=1e-4)


def test_mix_rows_selects_and_repeats():
    mix = Mix(torch.tensor([0.1, 0.2, 0.3]), 0.5).rows(torch.tensor([2, 0]), repeat=2)
    torch.testing.assert_close(mix.global_w, torch.tensor([0.3, 0.3, 0.1, 0.1]))
    assert mix.local_w == 0.5
    wg, wl = mix.as_rows(4)
    torch.testing.assert_close(wl, torch.full((4,), 0.5))
    assert wg.shape == (4,)


# --- training one adapter ------------------------------------------------------------------------


def test_training_local_updates_only_local(model, ids):
    before_g, before_l = lora_params(model, GLOBAL), lora_params(model, LOCAL)
    base_before = {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" not in k}
    with training(model, LOCAL) as params, mixed(model, Mix(0.5, 0.5)):
        assert {id(p) for p in params} == {
            id(p) for k, p in model.named_parameters() if f".{LOCAL}." in k and "lora_" in k
        }
        opt = torch.optim.SGD(params, lr=0.1)
        model(input_ids=ids).last_hidden_state.pow(2).sum().backward()
        for k, p in model.named_parameters():
            if "lora_" not in k or f".{GLOBAL}." in k:
                assert p.grad is None, k
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, k
        opt.step()
    after_g, after_l = lora_params(model, GLOBAL), lora_params(model, LOCAL)
    for k in before_g:
        assert torch.equal(before_g[k], after_g[k]), k
    for k in before_l:
        assert not torch.equal(before_l[k], after_l[k]), k
    for k, p in model.named_parameters():
        if k in base_before:
            assert torch.equal(p, base_before[k]), k


def test_training_context_restores_frozen_eval_state(model, ids):
    with training(model, GLOBAL) as params:
        assert params and model.training
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # the detach hooks are gone: gradients flow through both adapters again
    set_trainable(model, GLOBAL)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with mixed(model, Mix(0.5, 0.5)):
        model(inputs_embeds=emb).last_hidden_state.sum().backward()
    assert all(p.grad is not None for k, p in model.named_parameters() if p.requires_grad)
    set_trainable(model, None)


def _grads(model: PeftModel, ids: torch.Tensor, target: torch.Tensor):
    """Gradients of <output, target> wrt the trainable params and the input embeddings."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with mixed(model, Mix(0.5, 0.5)):
        loss = (model(inputs_embeds=emb).last_hidden_state * target).sum()
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*params, emb])
    return dict(zip([*names, "inputs_embeds"], grads, strict=True))


def test_global_path_carries_no_gradient_when_training_local(model, ids):
    """training(model, 'local') with a·ΔL + (1−a)·ΔG equals ΔG replaced by a constant."""
    target = torch.randn(*ids.shape, HIDDEN, generator=torch.Generator().manual_seed(4))

    # the global adapters' outputs in this forward, as plain constants
    captured: list[torch.Tensor] = []
    globals_b = [layer.lora_B[GLOBAL] for layer in lora_layers(model)]
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: captured.append(o.detach())) for b in globals_b
    ]
    with torch.no_grad(), mixed(model, Mix(0.5, 0.5)):
        model(input_ids=ids)
    for h in hooks:
        h.remove()

    with training(model, LOCAL):
        stopped = _grads(model, ids, target)

    # reference: same forward, the global outputs swapped for the captured constants
    set_trainable(model, LOCAL)
    consts = iter(captured)
    hooks = [b.register_forward_hook(lambda _m, _i, _o: next(consts).clone()) for b in globals_b]
    constant = _grads(model, ids, target)
    for h in hooks:
        h.remove()
    full = _grads(model, ids, target)  # no stop-grad: the global path carries gradient
    set_trainable(model, None)

    assert stopped.keys() == constant.keys()
    for k in stopped:
        torch.testing.assert_close(stopped[k], constant[k], atol=1e-6, rtol=1e-5)
    # the check is sensitive: without the detach, lower-layer grads pick up the global path
    layer0 = [k for k in stopped if ".layer.0." in k]
    assert layer0
    assert not torch.allclose(stopped["inputs_embeds"], full["inputs_embeds"], atol=1e-5)
    assert any(not torch.allclose(stopped[k], full[k], atol=1e-5) for k in layer0)


# --- state I/O -----------------------------------------------------------------------------------


def test_adapter_state_keys_have_no_adapter_name(model):
    for name in (GLOBAL, LOCAL):
        state = adapter_state(model, name)
        assert len(state) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
        for key in state:
            assert f".{GLOBAL}." not in key and f".{LOCAL}." not in key, key
            assert key.endswith((".lora_A.weight", ".lora_B.weight")), key
    assert adapter_state(model, GLOBAL).keys() == adapter_state(model, LOCAL).keys()


def test_adapter_state_is_a_detached_copy(model):
    state = adapter_state(model, GLOBAL)
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(adapter_state(model, GLOBAL)[key], state[key])


def test_load_adapter_state_round_trips(model, ids):
    g, loc = adapter_state(model, GLOBAL), adapter_state(model, LOCAL)
    with mixed(model, Mix(0.0, 1.0)):
        local_out = out(model, ids)
    load_adapter_state(model, GLOBAL, loc)  # copy local into global
    for k, v in adapter_state(model, GLOBAL).items():
        assert torch.equal(v, loc[k])
    with mixed(model, Mix(1.0, 0.0)):
        torch.testing.assert_close(out(model, ids), local_out, atol=1e-6, rtol=0)
    load_adapter_state(model, GLOBAL, g)
    for k, v in adapter_state(model, GLOBAL).items():
        assert torch.equal(v, g[k])
    assert all(torch.equal(v, loc[k]) for k, v in adapter_state(model, LOCAL).items())


def test_load_adapter_state_rejects_unknown_key(model):
    state = adapter_state(model, GLOBAL)
    state["base_model.model.nope.lora_A.weight"] = torch.zeros(R, HIDDEN)
    with pytest.raises(KeyError, match="nope"):
        load_adapter_state(model, GLOBAL, state)


def test_load_adapter_state_rejects_missing_key(model):
    state = adapter_state(model, GLOBAL)
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="7 tensors"):
        load_adapter_state(model, GLOBAL, state)


def test_load_adapter_state_rejects_keys_with_adapter_name(model):
    named = {
        k.replace(".weight", f".{GLOBAL}.weight"): v
        for k, v in adapter_state(model, GLOBAL).items()
    }
    with pytest.raises(KeyError):
        load_adapter_state(model, GLOBAL, named)


def test_fresh_adapter_state_is_seeded_with_zero_b(model):
    a, b, c = (fresh_adapter_state(model, s) for s in (7, 7, 8))
    assert a.keys() == adapter_state(model, GLOBAL).keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert a[k].shape == adapter_state(model, GLOBAL)[k].shape
        if ".lora_B." in k:
            assert torch.count_nonzero(a[k]) == 0, k
        else:
            assert not torch.equal(a[k], c[k]), k
            assert a[k].abs().max() <= 1 / HIDDEN**0.5  # kaiming-uniform(a=sqrt(5)) bound
            assert a[k].std() > 0.05


def test_fresh_adapter_state_is_model_independent(model):
    other = attach_dual_adapters(tiny_bert(seed=9), lora_config())
    randomize(other, seed=10)
    a, b = fresh_adapter_state(model, 3), fresh_adapter_state(other, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- stock PEFT on disk --------------------------------------------------------------------------


@pytest.mark.parametrize("name,mix", [(GLOBAL, Mix(1.0, 0.0)), (LOCAL, Mix(0.0, 1.0))])
def test_saved_adapter_loads_with_plain_peft(model, base, ids, tmp_path: Path, name, mix):
    state = adapter_state(model, name)
    save_adapter(state, lora_config(), tmp_path / name)
    assert (tmp_path / name / "adapter_config.json").is_file()
    reloaded = load_adapter(tmp_path / name)
    assert reloaded.keys() == state.keys()
    assert all(torch.equal(reloaded[k], state[k]) for k in state)

    plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name)).eval()
    with mixed(model, mix):
        expected = out(model, ids)
    torch.testing.assert_close(out(plain, ids), expected, atol=1e-5, rtol=0)
