import json
import subprocess
import sys

import pytest


def cli(*args):
    return subprocess.run([sys.executable, "-m", "toma_export.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_json_reports_patched_blocks_and_timings():
    res = cli("demo", "--size", "256x256", "--repeats", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"] == "flux-tiny" and len(out["patched_blocks"]) == 10
    # a working patch changes the trained model's output by about a tenth on smooth input; a broken one by ~1
    assert out["unpatched_ms"] > 0 and out["toma_ms"] > 0 and 0 < out["relative_error"] < 0.3
    assert "[3/3]" in res.stderr                                    # progress on stderr, JSON alone on stdout
    assert out["peak_rss_gb"] > 0.1 and out["peak_rss_children_gb"] >= 0


def test_demo_summary_for_sdxl():
    res = cli("demo", "--model", "sdxl-tiny", "--size", "256x256", "--repeats", "1")
    assert res.returncode == 0, res.stderr
    assert "ToMA patched 10 of 22 sdxl blocks" in res.stdout and "unpatched" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--ratio", "1"], "ratio must be in [0, 1)"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--size", "1008x1024", "--tile", "8x8"], "tile 8x8 does not divide the 63x64 token grid"),
])
def test_bad_input_is_one_clear_line(args, message, cli_here):
    res = cli_here("demo", *args)
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.strip().count("\n") == 0


def test_a_refusal_is_all_a_fresh_process_prints():
    """In a new interpreter, nothing its imports may print (warnings, banners) joins the one line."""
    res = cli("demo", "--model", "nope")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("toma-export: error: ")
    assert "unknown model 'nope'" in res.stderr and res.stderr.strip().count("\n") == 0
