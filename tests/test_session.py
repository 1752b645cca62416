"""moeviz.session: the one evaluation path of the app, the CLI and sweeps (lazy rule, calibration fingerprint,
run reuse)."""

import pytest

from moeviz.calibration import calibrate
from moeviz.compression import CompressionPlan, PruningSettings
from moeviz.compression.apply import Compressor
from moeviz.data import tokenize_documents
from moeviz.errors import PlanError
from moeviz.evaluation import EvalSettings, Evaluator, grid_plans
from moeviz.evaluation import sweep
from moeviz.session import Session
from moeviz.store import RunStore
from documents import varied_documents

DOCS = varied_documents(30, 20)
FAST = EvalSettings(batch_size=4, record_tokens=64, measure_latency=False)
PLAN = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5))


@pytest.fixture(scope="module")
def parts(loaded_tiny):
    lm = loaded_tiny("mixtral")
    cal = tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=0)
    held = tokenize_documents(DOCS, lm.tokenizer, 4, 16, seed=5)
    return lm, calibrate(lm, cal, batch_size=4), cal, Evaluator(lm, held, FAST)


def test_evaluate_stores_a_run_then_reuses_it_and_a_sweep_sees_the_same_run(parts, tmp_path):
    lm, stats, cal, ev = parts
    session = Session(lm, ev, RunStore(tmp_path / "runs.sqlite"), stats, cal)
    stages = []
    first = session.evaluate(PLAN, progress=lambda stage, done, total, left=None: stages.append(stage))
    assert not first.reused and first.run_id is not None
    assert stages[0] == "apply" and stages[-1] == "evaluate" and "evaluate" in stages
    again = session.evaluate(PLAN, progress=lambda *a: pytest.fail("a reused run evaluates nothing"))
    assert again.reused and again.run_id == first.run_id
    assert again.result.to_dict() == first.result.to_dict()
    df = session.sweep(grid_plans(["magnitude"], [0.5]))  # the CLI's and the Trade-offs page's path
    assert list(df["reused"]) == [True] and list(df["run_id"]) == [first.run_id]
    assert not session.evaluate(PLAN, reuse=False).reused  # asked for: a new run
    assert len(session.store.runs()) == 2


def test_one_lazy_rule_decides_how_every_evaluation_applies_the_plan(parts, monkeypatch):
    lm, stats, cal, ev = parts
    seen = []
    session = Session(lm, ev, None, stats, cal)
    apply = session.compressor.apply
    monkeypatch.setattr(session.compressor, "apply", lambda *a, **k: seen.append(k["lazy"]) or apply(*a, **k))
    assert not sweep.use_lazy(lm)  # a tiny model is materialised: its decode latency can be measured
    session.evaluate(PLAN)
    monkeypatch.setattr(sweep, "LAZY_ABOVE_BYTES", sweep.expert_bytes(lm) - 1)
    assert sweep.use_lazy(lm)
    session.evaluate(PLAN)
    assert seen == [False, True]


def test_windows_only_for_plans_that_need_them_and_a_clear_error_without_any(parts):
    lm, stats, cal, ev = parts
    session = Session(lm, ev, None, stats, cal)
    sequential = CompressionPlan(pruning=PruningSettings(metric="magnitude", sparsity=0.5), sequential=True)
    assert session.windows_for(PLAN) is None
    assert session.windows_for(sequential) is cal
    rebuilt = Session(lm, ev, None, stats).windows_for(sequential)  # kept windows lost: rebuilt from the stats' settings
    assert rebuilt.n_samples == stats.settings["n_samples"] and rebuilt.seq_len == stats.settings["seq_len"]
    with pytest.raises(PlanError, match="calibrat"):
        Session(lm, ev).windows_for(sequential)


def test_a_compressor_for_another_calibration_is_refused(parts):
    lm, stats, cal, ev = parts
    with pytest.raises(ValueError, match="another model or calibration"):
        Session(lm, ev, None, stats, cal, compressor=Compressor(lm))


def test_the_shared_evaluator_is_not_changed_by_an_evaluation(parts):
    """The app shares one Evaluator between browser sessions: evaluating writes none of its state (the base-task
    cache, filled under a lock, is the one documented exception)."""
    lm, stats, cal, ev = parts
    before = {k: (v, repr(v)) for k, v in vars(ev).items() if k != "_base_tasks"}
    Session(lm, ev, None, stats, cal).evaluate(CompressionPlan(pruning=PruningSettings(metric="wanda", sparsity=0.3)))
    after = {k: (v, repr(v)) for k, v in vars(ev).items() if k != "_base_tasks"}
    assert after.keys() == before.keys()
    assert all(after[k][0] is before[k][0] and after[k][1] == before[k][1] for k in before)


def test_measuring_latency_again_times_both_models_and_stores_it_with_the_run(parts, tmp_path):
    lm, stats, cal, ev = parts
    session = Session(lm, ev, RunStore(tmp_path / "runs.sqlite"), stats, cal)
    run_id = session.evaluate(PLAN).run_id
    ab = session.measure_latency(PLAN, decode_tokens=2, repeats=3, run_id=run_id)
    assert len(ab["base"]["samples"]) == len(ab["compressed"]["samples"]) == 3 and ab["runtime"] == "dense"
    stored = session.store.get_run(run_id)
    assert stored.metrics["latency_ab"] == ab and stored.extra["measured_decode_q1_ms"] == ab["compressed"]["q1"]
