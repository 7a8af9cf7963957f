import pytest
import torch

import toma_export as te
from conftest import run
from toma_export.toma.state import ToMAState


def test_step_clock_follows_timesteps():
    state = ToMAState(te.ToMAConfig())
    seen = []
    for t in [1.0, 0.9, 0.9, 0.8, torch.tensor([0.7, 0.7]), 1.0, 0.5]:
        state.begin_call(t)
        seen.append((state.step, state.call))
    # equal timestep = another call of the same step; a larger one = a new generation
    assert seen == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (0, 0), (1, 0)]


def test_without_timesteps_every_call_is_a_step():
    state = ToMAState(te.ToMAConfig())
    steps = []
    for _ in range(3):
        state.begin_call(None)
        steps.append(state.step)
    assert steps == [0, 1, 2]


@pytest.mark.parametrize("merge_steps,want", [(None, [True] * 7), (3, [True, False, False, True, False, False, True]),
                                              ([1, 2, 5], [False, True, True, False, False, True, False])])
def test_merge_steps(merge_steps, want):
    cfg = te.ToMAConfig(merge_steps=merge_steps)
    assert [cfg.merges_at(s) for s in range(7)] == want
    merged = [s for s in range(7) if cfg.merges_at(s)]
    assert [cfg.merged_index(s) for s in merged] == list(range(len(merged)))


def loop(model, spec, steps, **cfg):
    """Run `steps` denoising calls with decreasing timesteps; returns outputs and the state's counters."""
    te.apply_toma(model, te.ToMAConfig(**cfg))
    inputs = spec.sample_inputs(smooth=True)
    outs, dsts = [], []
    for i in range(steps):
        inputs["timestep"] = inputs["timestep"] * 0 + (1.0 - i / steps) * (999 if spec.family == "sdxl" else 1)
        outs.append(run(model, inputs))
        state = te.toma_state(model)
        dsts.append({k[0]: c.merge.dst.clone() for k, c in state.cache.items()})
    counts = dict(state.counts)
    te.remove_toma(model)
    return outs, dsts, counts


@pytest.mark.parametrize("name", ["flux-tiny", "sdxl-tiny"])
def test_non_merge_steps_run_the_full_model(tiny, name):
    model, spec = tiny(name), te.models.get(name)
    plain, _, _ = loop(model, spec, 4, blocks=["no-such-block*", "*"], ratio=0.0, merge_steps=[99])
    outs, _, counts = loop(model, spec, 4, merge_steps=2)
    groups = 2 if name == "flux-tiny" else 5
    assert counts == {"select": 2 * groups, "weights": 2 * groups}   # steps 0 and 2 only
    assert torch.equal(outs[1], plain[1]) and torch.equal(outs[3], plain[3])
    assert not torch.allclose(outs[0], plain[0])


def test_destinations_and_weights_follow_their_periods(tiny):
    model, spec = tiny("flux-tiny"), te.models.get("flux-tiny")
    _, dsts, counts = loop(model, spec, 4, dst_every=2)
    assert counts == {"select": 4, "weights": 8}                      # 2 groups x steps {0, 2}; weights every step
    for group in dsts[0]:
        assert torch.equal(dsts[1][group], dsts[0][group])            # reused on step 1
        assert torch.equal(dsts[3][group], dsts[2][group])
    _, _, counts = loop(model, spec, 4, dst_every=4, weights_every=2)
    assert counts == {"select": 2, "weights": 4}                      # dst at step 0; weights at steps 0 and 2


def test_cached_weights_are_reused_between_refreshes(tiny):
    model, spec = tiny("flux-tiny"), te.models.get("flux-tiny")
    te.apply_toma(model, te.ToMAConfig(dst_every=3, weights_every=3))
    inputs = spec.sample_inputs(smooth=True)
    run(model, inputs)
    first = {k: c.merge for k, c in te.toma_state(model).cache.items()}
    inputs["timestep"] = inputs["timestep"] * 0.5
    inputs["hidden_states"] = inputs["hidden_states"] + 1.0            # other features: weights would change
    run(model, inputs)
    second = {k: c.merge for k, c in te.toma_state(model).cache.items()}
    te.remove_toma(model)
    assert all(second[k] is first[k] for k in first)


def test_new_generation_resets_the_clock_and_cache(tiny):
    model, spec = tiny("sdxl-tiny"), te.models.get("sdxl-tiny")
    te.apply_toma(model, te.ToMAConfig(merge_steps=2))
    inputs = spec.sample_inputs(smooth=True)
    first = run(model, inputs)
    inputs["timestep"] = inputs["timestep"] - 500
    run(model, inputs)
    state = te.toma_state(model)
    assert state.step == 1
    inputs["timestep"] = inputs["timestep"] + 500                    # back to the first timestep: new image
    again = run(model, inputs)
    assert state.step == 0 and torch.equal(again, first)
    te.reset_toma(model)
    assert state.step == 0 and not state.cache and not state.started
    te.remove_toma(model)
    with pytest.raises(RuntimeError, match="apply_toma first"):
        te.reset_toma(model)


def test_two_calls_per_step_keep_separate_caches(tiny):
    """True CFG run as two calls with the same timestep: each call reuses its own destinations."""
    model, spec = tiny("flux-tiny"), te.models.get("flux-tiny")
    te.apply_toma(model, te.ToMAConfig(dst_every=2))
    cond, uncond = spec.sample_inputs(seed=1, smooth=True), spec.sample_inputs(seed=2, smooth=True)
    for t in (1.0, 0.5):
        for inputs in (cond, uncond):
            inputs["timestep"] = torch.full_like(inputs["timestep"], t)
            run(model, inputs)
    state = te.toma_state(model)
    te.remove_toma(model)
    assert state.counts["select"] == 4                                # 2 groups x 2 calls, at step 0 only
    assert {k[1] for k in state.cache} == {0, 1}
    assert not torch.equal(state.cache["transformer_blocks", 0].merge.dst, state.cache["transformer_blocks", 1].merge.dst)


def test_the_served_schedule_takes_forced_destinations_for_one_merged_call():
    """validate --cache forces the reference's picks into the served tail (a near-tie must not fail a step): the
    next merged call gets them, reshaped to the graph's input, with recompute off; the call after selects again."""
    from toma_export.onnx.graph import RECOMPUTE, dst_input
    from toma_export.serve.schedule import DestinationSchedule

    schedule, shapes = DestinationSchedule(te.ToMAConfig(), ["g"]), {dst_input("g"): (1, 2, 2, 8)}
    picks = torch.randint(0, 16, (1, 4, 8))                       # (B, T, d) as the PyTorch patch keeps them
    schedule.force({"g": picks})
    plan = schedule.plan(1.0)
    feeds = schedule.toma_feeds(plan, shapes)
    assert torch.equal(feeds[dst_input("g")], picks.reshape(1, 2, 2, 8))
    assert not feeds[RECOMPUTE].item() and not plan.recompute
    plan = schedule.plan(0.5)
    assert schedule.toma_feeds(plan, shapes)[RECOMPUTE].item() and plan.recompute
