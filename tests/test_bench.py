"""`toma-export bench` end to end at small token counts: real blocks, real ONNX Runtime, real tomesd."""
import json
import types

import pytest
import torch

from toma_export.bench import blocks, report, timing
from toma_export.bench.run import BenchOptions, amortised, bench_block
from toma_export.cli import main

# one ratio, the default: each ratio adds ten block and part exports per block (about 35 s of the suite);
# test_rows_come_from_the_median_of_the_timed_rounds covers two ratios in one run without exporting
QUICK = ["bench", "--grid", "16", "--text", "16", "--flux-width", "128", "--ratios", "0.5", "--repeats", "1",
         "--warmup", "0", "--quantize", "int8"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{report.BEGIN}\nold table\n{report.END}\n\nafter\n")
    code = main(QUICK + ["--models", "flux-tiny", "--model-size", "256", "--out", str(out / "results"),
                         "--readme", str(readme)])
    assert code == 0
    return json.loads((out / "results" / "results.json").read_text()), out, readme


def test_json_has_every_row_with_consistent_ratios(quick_run):
    doc, _, _ = quick_run
    assert {"machine", "versions", "results", "targets", "command"} <= set(doc)
    assert doc["versions"]["tomesd"] and doc["versions"]["onnxruntime"]
    rows = doc["results"]
    keys = {(r["block"].split("-")[0], r["backend"], r["method"], r["ratio"]) for r in rows}
    for block in ("sdxl", "flux"):
        for backend in ("torch", "onnxruntime"):
            assert (block, backend, "baseline", 0.0) in keys
            assert (block, backend, "toma", 0.5) in keys
    assert ("sdxl", "torch", "tomesd", 0.5) in keys
    assert not any(r["method"] == "tomesd" and r["block"].startswith("flux") for r in rows)
    baselines = {(r["block"], r["backend"]): r for r in rows if r["method"] == "baseline"}
    for r in rows:
        assert r["median_ms"] > 0
        # every row is set against the baseline row timed in the same run, for the same block and backend
        assert r["baseline_median_ms"] == baselines[r["block"], r["backend"]]["median_ms"]
        if r["method"] == "baseline":
            assert r["speedup"] == r["latency_ratio"] == 1.0 and r["overhead_share"] is None
        if r["method"] == "toma" and "whole model" not in r["block"]:
            assert 0 < r["overhead_share"] < 5          # measured on the same backend, never missing
            assert 0 < r["rel_l2_vs_baseline"] < 0.5     # merged, so different from the baseline, but close
    assert sum(r["default"] for r in rows if "whole model" not in r["block"]) == 4   # ratio 0.5 per block/backend
    for r in rows:
        if r["method"] != "toma" or "whole model" in r["block"]:
            assert "breakdown" not in r
            continue
        b = r["breakdown"]                       # every part timed alone, on the row's own backend
        assert all(b[f"{part}_ms"] > 0 for part in blocks.PARTS)
        assert b["round_trips"] == (3 if r["block"].startswith("sdxl") else 1)
        parts = {part: b[f"{part}_ms"] for part in blocks.PARTS}
        assert b["sum_ms"] == pytest.approx(blocks.parts_total(parts, b["round_trips"]), abs=1e-2)
    schedules = {(a["block"], a["backend"], a["ratio"], a["schedule"]): a for a in doc["amortised"]}
    assert len(schedules) == 2 * sum(1 for r in rows if "breakdown" in r)
    for a in doc["amortised"]:
        assert a["merged_steps"] == (30 if a["schedule"] == "default" else 10)
        assert (a["groups"], a["patched_blocks"]) == ((5, 10) if a["model"] == "sdxl-base" else (2, 47))
        if a["schedule"] != "default":      # a third of the steps merge: a third of the default's cost
            default = schedules[a["block"], a["backend"], a["ratio"], "default"]
            assert a["overhead_per_step_ms"] == pytest.approx(default["overhead_per_step_ms"] / 3, rel=1e-3)
    whole = [r for r in rows if "whole model" in r["block"]]
    assert [r["method"] for r in whole] == ["baseline", "toma"] and whole[0]["block"].startswith("flux-tiny")


def test_targets_say_whether_met_and_by_how_much(quick_run):
    doc, _, _ = quick_run
    assert len(doc["targets"]) == 6
    for t in doc["targets"]:
        if "width 3072" in t["name"]:          # the quick run's FLUX block is 128 wide: not measured
            assert t["measured"] is None and t["met"] is None and t["row"] is None
            continue
        assert t["measured"] is not None and t["met"] == (t["measured"] <= t["limit"])
        assert t["missed_by"] == pytest.approx(max(0.0, t["measured"] - t["limit"]), abs=1e-3)
    worst = next(t for t in doc["targets"] if t["name"].startswith("every block"))
    shares = [r["overhead_share"] for r in doc["results"] if r["method"] == "toma" and "whole model" not in r["block"]]
    assert worst["measured"] == max(shares)


def test_int8_rows_and_the_four_way_table(quick_run):
    """`--quantize int8`: each block INT8 and INT8 + ToMA on ONNX Runtime (modelopt's scales, the integer
    kernels), set against the same run's baseline, and whether the speed-ups multiply, by arithmetic."""
    doc, _, _ = quick_run
    rows = {(r["block"].split("-")[0], r["backend"], r["method"], r["ratio"]): r for r in doc["results"]}
    for block in ("sdxl", "flux"):
        assert (block, "onnxruntime", "int8", 0.0) in rows and (block, "torch", "int8", 0.0) not in rows
        for ratio in (0.5,):
            both = rows[block, "onnxruntime", "int8+toma", ratio]
            assert 0 < both["rel_l2_vs_baseline"] < 0.5 and both["median_ms"] > 0
    assert len(doc["four_way"]) == 2
    for f in doc["four_way"]:
        toma = rows[f["block"].split("-")[0], f["backend"], "toma", f["ratio"]]
        int8 = rows[f["block"].split("-")[0], f["backend"], "int8", 0.0]
        assert f["product"] == pytest.approx(toma["speedup"] * int8["speedup"], abs=1e-3)
        assert f["multiplies"] == (f["both_speedup"] >= 0.9 * f["product"])
    assert "8-bit and ToMA together" in report.table(doc)


def test_parts_run_in_half_precision_as_the_gpu_mode_runs_them():
    """The GPU mode times the parts in fp16 (no GPU here: the same modules on the CPU): activations stay
    fp16, the similarity and the weights fp32, and the parts chain into what the patched block computes."""
    from toma_export.toma import ToMAConfig
    from toma_export.toma.merge import TileMerge

    case = blocks.sdxl_block(grid=8)
    got = {name: module(*inputs) for name, (module, inputs) in
           blocks.parts(case, ToMAConfig(), "cpu", torch.float16).items()}
    assert [got[p].dtype for p in ("fold", "merge", "unmerge", "unfold")] == [torch.float16] * 4
    assert got["similarity"].dtype == torch.float32 and got["selection"].dtype == torch.int64
    assert [w.dtype for w in got["weights"]] == [torch.float32] * 2
    hidden = case.inputs["hidden_states"].half()
    want = TileMerge.compute(hidden, (8, 8), (4, 4), 0.5, 1000.0)
    assert torch.equal(got["selection"], want.dst)
    torch.testing.assert_close(got["merge"].flatten(1, 2), want.merge(hidden))


def test_amortised_figures_follow_the_schedule_by_hand():
    """One SDXL row with made-up parts: SDXL base's default patch has 5 groups of 10 blocks. Per merged
    step a group pays selection + weights (2 + 1 ms), a block its layout copies and 3 round trips
    (0.5 + 0.5 + 3 * (1 + 1) = 7 ms): 5 * 3 + 10 * 7 = 85 ms on each of the 30 steps by default, on every
    3rd step (10 of 30) under the official FLUX schedule: 850 / 30 ms per step. The parts add up to the
    10 ms measured together, so they are taken as they are."""
    parts = dict(fold_ms=0.5, similarity_ms=0.4, selection_ms=2.0, weights_ms=1.0, merge_ms=1.0, unmerge_ms=1.0,
                 unfold_ms=0.5)
    row = dict(block="sdxl-block-64x64", backend="torch", method="toma", ratio=0.5, baseline_median_ms=100.0,
               overhead_ms=10.0, overhead_share=0.1, breakdown=dict(parts, round_trips=3, sum_ms=10.0))
    got = {a["schedule"]: a for a in amortised([row, dict(row, method="baseline", breakdown=None)])}
    assert list(got) == ["default", "official FLUX (merge every 3rd step)"]
    default, official = got.values()
    assert (default["overhead_per_step_ms"], default["overhead_share_per_step"]) == pytest.approx((85.0, 0.085))
    assert (official["overhead_per_step_ms"], official["overhead_share_per_step"]) == pytest.approx(
        (850 / 30, 850 / 30 / 1000), abs=1e-3)
    assert default["patched_baseline_per_step_ms"] == 1000.0 and official["every_call_share"] == 0.1
    # parts that add up to half the overhead measured together are scaled up to it: twice the cost
    doubled = amortised([dict(row, overhead_ms=20.0)])[0]
    assert doubled["overhead_per_step_ms"] == pytest.approx(170.0)


def test_table_plot_and_readme_match_the_json(quick_run):
    doc, out, readme = quick_run
    table = (out / "results" / "results.md").read_text()
    assert table == report.table(doc)
    broken_down = sum("breakdown" in r for r in doc["results"])
    amortised_rows = sum(a["ratio"] == 0.5 for a in doc["amortised"])
    # four tables, each a header and one line per row: results, parts, amortised at the default ratio, and
    # 8-bit with ToMA
    assert table.count("\n| ") == (len(doc["results"]) + 1 + broken_down + 1 + amortised_rows + 1
                                   + len(doc["four_way"]) + 1)
    png = (out / "results" / "latency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("\nafter\n") and "old table" not in text
    assert table in text and "](results/latency.png)" in text
    kind = report.machine_kind(doc)              # this machine's run is kept beside other machine kinds'
    assert json.loads((out / "results" / "machines" / f"{kind}.json").read_text()) == doc
    assert report.machines_table(out / "results") in text and doc["machine"]["cpu"] in text


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["bench", "--ratios", "0.5,1.5"]) == 2
    assert main(["bench", "--blocks", "sd15"]) == 2
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert main(QUICK + ["--blocks", "sdxl", "--backends", "torch", "--models", "", "--no-peer", "--out",
                         str(tmp_path / "r"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("toma-export: error:")]
    assert len(errors) == 3
    assert "ratio" in errors[0] and "sd15" in errors[1] and "markers" in errors[2]
    assert readme.read_text() == "no markers\n"


def test_rows_come_from_the_median_of_the_timed_rounds(monkeypatch, tmp_path):
    """bench_block on a stand-in block whose variants take known times on a fake clock (timing's
    perf_counter): the real round-robin and row code must turn those samples into the numbers worked out by
    hand below: warm-up rounds dropped, the median (not the mean) of the timed rounds, and speedup, latency
    ratio and overhead share against the baseline's median."""
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    class Variant(torch.nn.Module):
        def __init__(self, ms, scale=1.0):
            super().__init__()
            self.ms, self.scale, self.calls = ms, scale, 0

        def forward(self, x, *_):
            clock.now += self.ms[min(self.calls, len(self.ms) - 1)] / 1e3
            self.calls += 1
            return x * self.scale

    # one warm-up round (slow, must be dropped), then three timed rounds
    times = {"baseline": [90.0, 12.0, 10.0, 20.0],      # median 12 ms (mean 14)
             "toma@0.5": [90.0, 6.0, 5.0, 30.0],        # median 6 ms: speedup 12 / 6 = 2, ratio 0.5
             "toma@0.25": [90.0, 9.0, 8.0, 7.0],        # median 8 ms: speedup 1.5, ratio 0.667
             "overhead@0.5": [90.0, 0.24, 0.2, 0.3],    # median 0.24 ms: 2 % of 12 ms
             "overhead@0.25": [90.0, 0.12, 0.6, 0.1]}   # median 0.12 ms: 1 % of 12 ms
    case = types.SimpleNamespace(
        name="stand-in", inputs=dict(x=torch.ones(2, 3)),
        baseline=lambda: Variant(times["baseline"]),
        toma=lambda config: Variant(times[f"toma@{config.ratio}"], scale=1.1 if config.ratio == 0.5 else 0.8),
        overhead=lambda config: Variant(times[f"overhead@{config.ratio}"]))
    from toma_export.bench import run as bench_run       # the parts are timed on the real blocks above
    monkeypatch.setattr(bench_run, "bench_parts", lambda case, backend, config, *a: {"ratio": config.ratio})
    rows = bench_block(case, "torch", BenchOptions(ratios=(0.25, 0.5), repeats=3, warmup=1), tmp_path, [],
                       lambda msg: None)
    got = {(r["method"], r["ratio"]): r for r in rows}
    assert list(got) == [("baseline", 0.0), ("toma", 0.25), ("toma", 0.5)]
    assert all(r["baseline_median_ms"] == pytest.approx(12.0) for r in rows)
    base, quarter, half = got["baseline", 0.0], got["toma", 0.25], got["toma", 0.5]
    assert (base["median_ms"], base["speedup"], base["latency_ratio"]) == pytest.approx((12.0, 1.0, 1.0))
    assert (half["median_ms"], half["speedup"], half["latency_ratio"]) == pytest.approx((6.0, 2.0, 0.5))
    assert (quarter["median_ms"], quarter["speedup"], quarter["latency_ratio"]) == pytest.approx(
        (8.0, 1.5, 0.667), abs=1e-3)
    assert (half["overhead_ms"], half["overhead_share"]) == pytest.approx((0.24, 0.02))
    assert (quarter["overhead_ms"], quarter["overhead_share"]) == pytest.approx((0.12, 0.01))
    # outputs 1.1x and 0.8x the baseline's: 10 % and 20 % away from it
    assert (half["rel_l2_vs_baseline"], quarter["rel_l2_vs_baseline"]) == pytest.approx((0.1, 0.2))
    assert half["default"] and not quarter["default"] and not base["default"]
    assert (half["breakdown"], quarter["breakdown"]) == ({"ratio": 0.5}, {"ratio": 0.25}) and "breakdown" not in base


def test_a_whole_model_is_loaded_once_and_patched_on_a_tree_sharing_its_weights(monkeypatch):
    """bench --models used to load each model twice (baseline and patched): for a real folder, twice its
    weights read and held. Now one load; the patched tree shares every parameter tensor with the baseline,
    which stays unpatched, and the rows still compare the two."""
    from toma_export.bench import run as bench_run
    from toma_export.families.spec import ModelSpec

    loads = []
    original = ModelSpec.load
    monkeypatch.setattr(ModelSpec, "load", lambda self, *a, **k: loads.append(self.name) or original(self, *a, **k))
    shared = []
    real_sharing = bench_run.sharing_weights

    def spy(model):
        copy = real_sharing(model)
        shared.append((model, copy))
        return copy

    monkeypatch.setattr(bench_run, "sharing_weights", spy)
    rows = bench_run.bench_model("flux-tiny", BenchOptions(model_size=128, repeats=1, warmup=0))
    assert loads == ["flux-tiny"]
    base, patched = shared[0]
    assert [p.data_ptr() for p in base.parameters()] == [p.data_ptr() for p in patched.parameters()]
    assert getattr(patched, "_toma", None) is not None and getattr(base, "_toma", None) is None
    assert not any(type(m).__name__.startswith("ToMA") for m in base.modules())
    assert [r["method"] for r in rows] == ["baseline", "toma"] and rows[1]["rel_l2_vs_baseline"] > 0


def test_json_on_stdout_is_kept_clean_of_native_loggers(quick_run, monkeypatch, capfd):
    """TensorRT's logger writes to file descriptor 1. Stand-in: the bench run writes there itself (TensorRT
    cannot be installed here); --json must still print exactly one JSON object on stdout."""
    import os

    from toma_export.bench import run as bench_run

    def noisy_run(options):
        os.write(1, b"[TRT] [I] a line a native logger printed\n")
        return quick_run[0]

    monkeypatch.setattr(bench_run, "run", noisy_run)
    assert main(["bench", "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["results"] == quick_run[0]["results"]
    assert "a line a native logger printed" in err
