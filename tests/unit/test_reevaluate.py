"""`feddpa eval` / RunEvaluator: eval.* overrides reach the loaded model (generation settings live
in a causal LM's model object, so an override that only changed the config was silently ignored)."""

from __future__ import annotations

from run_helpers import llama_cfg

import feddpa.orchestrator.loop as loop
from feddpa.orchestrator.executor import InProcessExecutor
from feddpa.orchestrator.reevaluate import RunEvaluator


def test_eval_overrides_reach_the_generating_model(small_cfg, tiny_llama_dir, tmp_path):
    cfg = llama_cfg(
        small_cfg,
        tiny_llama_dir,
        {"method": "fedit", "federation": {"rounds": 1}, "eval": {"causal": "generate"}},
    )
    run_dir = tmp_path / "run"
    loop.train(cfg, run_dir, InProcessExecutor)
    evaluator = RunEvaluator(run_dir)
    model = evaluator.executor.host.model
    seen = []
    real_generate = model.generate

    def spy(examples, mix):
        seen.append((model.eval_cfg.num_beams, model.eval_cfg.max_new_tokens))
        return real_generate(examples, mix)

    model.generate = spy
    evaluator.evaluate(["eval.num_beams=2", "eval.max_new_tokens=3"])
    assert seen and set(seen) == {(2, 3)}
    seen.clear()
    evaluator.evaluate([])  # back to the run's own settings
    assert set(seen) == {(cfg.eval.num_beams, cfg.eval.max_new_tokens)}
