"""The causal-LM task model on a tiny Llama loaded with `from_pretrained`: sequences, training,
representations, per-row adapter mixes in scoring and generation, ROUGE-1 scoring."""

from __future__ import annotations

import math

import pytest
import torch
from peft.tuners.lora import LoraLayer

from feddpa.core.adapters import (
    GLOBAL,
    GLOBAL_ONLY,
    LOCAL,
    LOCAL_ONLY,
    Mix,
    adapter_state,
    load_adapter_state,
    mixed,
)
from feddpa.core.config import EvalConfig, LoraSettings, ModelConfig, TrainConfig
from feddpa.core.models import build_task_model
from feddpa.core.models.causal import IGNORE, prompt_for
from feddpa.core.records import Example, format_options
from feddpa.core.training import Phase, run_phase

EVAL = EvalConfig(num_beams=2, max_new_tokens=5)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    threads = torch.get_num_threads()
    cfg = ModelConfig(kind="causal_lm", path=str(tiny_llama_dir), max_length=96, threads=1)
    yield build_task_model(cfg, LoraSettings(), EVAL)
    torch.set_num_threads(threads)


def randomize_adapters(model, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero lora_B in both adapters (different per adapter) so that mixes change outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name in (GLOBAL, LOCAL):
        state = adapter_state(model.peft, name)
        for key, value in state.items():
            noise = torch.randn(value.shape, generator=gen)
            state[key] = noise * std if ".lora_B." in key else value + 0.1 * noise
        load_adapter_state(model.peft, name, state)


def mc(stem: str, options: list[str], answer: str, task: str = "t") -> Example:
    return Example(format_options(stem, options), answer, task)


MC_ITEMS = [
    mc("Is the movie brilliant or awful?", ["positive", "negative"], "positive"),
    mc(
        "Route this ticket about a refund",
        ["billing team", "tech support", "logistics"],
        "logistics",
    ),
    mc("Which animal is a salmon?", ["mammal", "insect", "bird", "fish"], "fish"),
    mc("A short one", ["yes", "no"], "no"),
]
FREE_ITEMS = [
    Example("Write a greeting for a friend.", "hello my friend", "free"),
    Example("Name a colour of the sky at night in a long sentence please.", "dark blue", "free"),
]
ROW_MIX = Mix(
    torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2]), torch.tensor([0.1, 0.8, 0.5, 1.0, 0.3, 0.6])
)


def row_mix(i: int, mix: Mix = ROW_MIX) -> Mix:
    return Mix(float(mix.global_w[i]), float(mix.local_w[i]))


def test_lora_targets_q_and_v_projections(model):
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.peft.named_modules() if isinstance(m, LoraLayer)
    }
    assert names == {"q_proj", "v_proj"}
    assert set(model.peft.peft_config) == {GLOBAL, LOCAL}
    assert set(model.peft.peft_config[GLOBAL].target_modules) == {"q_proj", "v_proj"}


def test_training_sequence_masks_prompt_and_ends_with_eos(model):
    ex = Example("Translate to French: good morning", "bonjour tout le monde", "t")
    prompt = model.tokenizer(prompt_for(ex.instruction))["input_ids"]
    ids, labels = model.training_sequence(ex)
    assert len(ids) == len(labels) <= model.max_length
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert ids[-1] == model.tokenizer.eos_token_id
    assert model.tokenizer.decode(ids[len(prompt) : -1]) == ex.output


def test_training_sequence_is_cut_at_max_length(model):
    ex = Example("Repeat the words.", " ".join(["word"] * 200), "t")
    ids, labels = model.training_sequence(ex)
    assert len(ids) == len(labels) == model.max_length
    assert labels[-1] == ids[-1] != IGNORE  # the cut keeps the prompt and the answer's start


def test_loss_is_finite_and_falls_with_training(model):
    randomize_adapters(model, seed=1, std=0.0)
    data = [
        Example(f"Say the colour number {i}.", ["red", "green", "blue"][i % 3], "colours")
        for i in range(6)
    ]
    before = float(model.loss(data, GLOBAL_ONLY))
    cfg = TrainConfig(lr=1e-2, batch_size=6, micro_batch_size=3)
    result = run_phase(model, data, Phase("global", GLOBAL, GLOBAL_ONLY, 4), cfg, seed=0)
    after = float(model.loss(data, GLOBAL_ONLY))
    assert math.isfinite(before) and all(math.isfinite(x) for x in result.epoch_losses)
    assert result.steps == 4 and len(result.epoch_losses) == 4
    assert list(result.epoch_losses) == sorted(result.epoch_losses, reverse=True)
    assert after < before - 0.05
    assert not any(p.requires_grad for p in model.peft.parameters())  # training() restored


def test_represent_is_the_last_prompt_token_hidden_state(model):
    randomize_adapters(model, seed=2)
    texts = [
        prompt_for("short"),
        prompt_for("a much longer instruction with many more words in it"),
    ]
    both = model.represent(texts)
    assert both.shape == (2, model.peft.get_base_model().config.hidden_size)
    for i, text in enumerate(texts):
        alone = model.represent([text])
        torch.testing.assert_close(both[i : i + 1], alone, atol=1e-5, rtol=0)
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        with torch.no_grad(), mixed(model.peft, LOCAL_ONLY):
            hidden = model.peft(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(alone[0], hidden[0, -1], atol=1e-5, rtol=0)


def test_represent_uses_the_local_adapter_only(model):
    randomize_adapters(model, seed=3)
    texts = [prompt_for("what is the weather"), prompt_for("route this ticket")]
    before = model.represent(texts)
    state = adapter_state(model.peft, GLOBAL)
    load_adapter_state(model.peft, GLOBAL, {k: v * 3 for k, v in state.items()})
    torch.testing.assert_close(model.represent(texts), before, atol=1e-6, rtol=0)
    state = adapter_state(model.peft, LOCAL)
    load_adapter_state(model.peft, LOCAL, {k: v * 3 for k, v in state.items()})
    assert not torch.allclose(model.represent(texts), before, atol=1e-3)


def test_option_scores_with_per_row_mix_equal_per_example(model):
    randomize_adapters(model, seed=5)
    mix = Mix(ROW_MIX.global_w[:4], ROW_MIX.local_w[:4])
    batch = model.option_loglik(MC_ITEMS, mix)
    for i, ex in enumerate(MC_ITEMS):
        (alone,) = model.option_loglik([ex], row_mix(i, mix))
        assert batch[i].shape == (len(ex.options),)
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=0)
    swapped = model.option_loglik(MC_ITEMS, Mix(mix.local_w, mix.global_w))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(batch, swapped, strict=True))


def test_score_mixed_batch_equals_per_example(model):
    randomize_adapters(model, seed=6)
    items = [MC_ITEMS[0], FREE_ITEMS[0], MC_ITEMS[1], MC_ITEMS[2], FREE_ITEMS[1], MC_ITEMS[3]]
    scores, preds = model.score(items, ROW_MIX)
    for i, ex in enumerate(items):
        s, p = model.score([ex], row_mix(i))
        assert (scores[i], preds[i]) == (s[0], p[0])
        if ex.options:
            assert preds[i] in ex.options and scores[i] == float(preds[i] == ex.output)
            ll = model.option_loglik([ex], row_mix(i))[0]
            assert preds[i] == ex.options[int(ll.argmax())]


def test_generate_per_row_mix_equals_one_at_a_time(model):
    randomize_adapters(model, seed=7)
    items = [*FREE_ITEMS, MC_ITEMS[1], MC_ITEMS[3]]
    mix = Mix(ROW_MIX.global_w[:4], ROW_MIX.local_w[:4])
    try:
        for beams in (1, 2):
            model.eval_cfg = EvalConfig(num_beams=beams, max_new_tokens=5)
            batch = model.generate(items, mix)
            alone = [model.generate([ex], row_mix(i, mix))[0] for i, ex in enumerate(items)]
            assert batch == alone, f"num_beams={beams}"
            assert any(batch)
        model.eval_cfg = EvalConfig(num_beams=1, max_new_tokens=5)
        as_global = model.generate(items, GLOBAL_ONLY)
        as_local = model.generate(items, LOCAL_ONLY)
        assert as_global != as_local  # the adapters (and so the mix) matter
    finally:
        model.eval_cfg = EVAL


def test_free_text_items_are_scored_by_rouge1(model):
    randomize_adapters(model, seed=8)
    scores, preds = model.score(FREE_ITEMS, Mix(0.5, 0.5))
    for ex, s, p in zip(FREE_ITEMS, scores, preds, strict=True):
        assert 0.0 <= s <= 1.0
        assert s == model.rouge.score(ex.output, p)["rouge1"].fmeasure
    assert model.rouge.score("hello my friend", "hello friend")["rouge1"].fmeasure == pytest.approx(
        0.8
    )


def test_generate_mode_scores_option_items_by_rouge(model):
    randomize_adapters(model, seed=9)
    try:
        model.eval_cfg = EvalConfig(causal="generate", num_beams=1, max_new_tokens=5)
        scores, preds = model.score(MC_ITEMS[:2], GLOBAL_ONLY)
        assert preds == model.generate(MC_ITEMS[:2], GLOBAL_ONLY)
        for ex, s, p in zip(MC_ITEMS[:2], scores, preds, strict=True):
            assert s == model.rouge.score(ex.output, p)["rouge1"].fmeasure
    finally:
        model.eval_cfg = EVAL


def test_generate_rows_stream_each_rows_text_as_it_is_decoded(model, monkeypatch):
    """Greedy rows stream live through transformers' streamer interface (deltas arrive while
    `generate` runs); beam search cannot stream, so its rows are replayed token by token after.
    Either way a row's deltas join to its text, and the text is what `generate` returns."""
    randomize_adapters(model, seed=10)
    mix = Mix(ROW_MIX.global_w[:2], ROW_MIX.local_w[:2])
    running = [False]
    real = model.peft.generate

    def watched(**kwargs):
        running[0] = True
        try:
            return real(**kwargs)
        finally:
            running[0] = False

    monkeypatch.setattr(model.peft, "generate", watched)
    for beams, live in ((1, True), (2, False)):
        parts: dict[int, list[str]] = {0: [], 1: []}
        during: list[bool] = []

        def sink(row: int, delta: str, parts=parts, during=during) -> None:
            parts[row].append(delta)
            during.append(running[0])

        rows = model.generate_rows(FREE_ITEMS, mix, 6, beams, on_text=sink)
        assert [g.text for g in rows] == model.generate(FREE_ITEMS, mix, 6, beams)
        for row, g in enumerate(rows):
            assert "".join(parts[row]) == g.text and len(parts[row]) > 1, beams
            assert g.completion_tokens == 6 and g.finish_reason == "length"
        assert set(during) == {live}, beams


def test_a_row_ends_at_its_first_stop_token_which_is_counted(model, monkeypatch):
    """`completion_tokens` counts the tokens generated up to and with the stop token; the text
    and the streamed deltas end before it; `finish_reason` says why decoding ended."""
    randomize_adapters(model, seed=11)
    outputs = []
    real = model.peft.generate
    monkeypatch.setattr(
        model.peft, "generate", lambda **kw: outputs.append(real(**kw)) or outputs[-1]
    )
    free = model.generate_rows(FREE_ITEMS[:1], GLOBAL_ONLY, 6, 1)[0]
    prompt = model._prompt_batch([prompt_for(FREE_ITEMS[0].instruction)])["input_ids"]
    assert free.prompt_tokens == prompt.shape[1] and free.finish_reason == "length"
    new = outputs[0][0, prompt.shape[1] :].tolist()
    k = next(k for k in range(1, len(new)) if new[k] not in new[:k])  # first seen at place k
    monkeypatch.setattr(model, "_stop_ids", lambda: frozenset({new[k]}))
    parts: list[str] = []
    (stopped,) = model.generate_rows(
        FREE_ITEMS[:1], GLOBAL_ONLY, 6, 1, on_text=lambda _, d: parts.append(d)
    )
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == k + 1
    assert stopped.text == model.tokenizer.decode(new[:k]).strip() == "".join(parts)


def full_logits_loglik(model, examples: list[Example], mix: Mix) -> list[torch.Tensor]:
    """The previous scoring, as a reference: every option sequence in one right-padded forward
    with full-vocabulary logits at every position, read at the answer positions."""
    seqs, labels, owners = model.option_sequences(examples)
    batch = model._pad(seqs, labels, left=False)
    with torch.no_grad(), mixed(model.peft, mix.rows(torch.tensor(owners))):
        logits = model.peft(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1))
    per_seq = (logp.squeeze(-1) * keep).sum(1) / keep.sum(1)
    owner_t = torch.tensor(owners)
    return [per_seq[owner_t == i] for i in range(len(examples))]


def test_option_scores_compute_logits_only_at_answer_positions_in_chunks(model):
    """Option scoring applies the LM head to the answer positions alone, `option_rows` sequences
    per pass (memory bounded per pass), and equals full-logit scoring within float rounding."""
    randomize_adapters(model, seed=12)
    want = full_logits_loglik(model, MC_ITEMS, ROW_MIX)
    head_inputs: list[tuple[int, ...]] = []
    head = model.peft.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0].shape))
    longest = max(len(model._ids(o, special=False)) + 1 for ex in MC_ITEMS for o in ex.options)
    try:
        for rows in (32, 3):  # 3: an item's options are split across passes
            model.option_rows = rows
            head_inputs.clear()
            got = model.option_loglik(MC_ITEMS, ROW_MIX)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            n_options = sum(len(ex.options) for ex in MC_ITEMS)
            assert len(head_inputs) == -(-n_options // rows)  # ceil: one pass per chunk
            for shape in head_inputs:
                assert shape[0] <= rows and shape[1] <= longest + 1, shape
    finally:
        hook.remove()
        model.option_rows = 32
