"""Real-architecture runs: what exporting, building and validating FLUX.1-dev and SDXL base costs.

Random-weight folders with the real configurations (toma_export.models.real_configs; FLUX.1-dev cut to
1+2, 2+4, 4+8, 8+16 blocks at its real width, the full SDXL base UNet) go through the commands users run,
each in its own process, timed, with the process's peak RSS (os.wait4) and the files' sizes:
  export    the folder's dtype (FLUX bf16, SDXL fp16) at 1024x1024, static;
  build     TensorRT-RTX, static, reusing that export (skipped past --max-build-params);
  parity    an fp16 export at --parity-size, validated in ONNX Runtime against the fp32 PyTorch reference,
            one step with forced destinations and a --steps loop (the bf16-weights path: FLUX's weights
            are stored in bf16, the candidate runs fp16, the reference fp32).
The full FLUX.1-dev (19+38 blocks) is extrapolated from the FLUX series by least squares on the parameter
count. Prints the results JSON; writes results.json and results.md to --out and the table into --readme
(docs/real-size-models.md).
Exit 1 if any command failed or any parity check did not pass (make test-large gates on it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from toma_export.bench.report import check_readme, fill_readme
from toma_export.bench.run import BenchOptions, machine
from toma_export.models import real_configs

BEGIN, END = "<!-- real-models:begin -->", "<!-- real-models:end -->"
FULL_FLUX = (19, 38)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flux", default="1+2,2+4,4+8,8+16", help="FLUX.1-dev depths, double+single (1+2,2+4,4+8,8+16)")
    p.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=True, help="the full SDXL base UNet")
    p.add_argument("--size", default="1024x1024", help="export and build size (1024x1024)")
    p.add_argument("--parity-size", default="512x512", help="fp16 parity size (512x512)")
    p.add_argument("--parity-text-len", type=int, default=64, help="text tokens of the parity exports (64)")
    p.add_argument("--steps", type=int, default=2, help="parity loop steps (2)")
    p.add_argument("--max-build-params", type=float, default=3.0,
                   help="skip TensorRT-RTX builds of models above this many billion parameters (3.0; a build "
                        "holds about 4x the weights)")
    p.add_argument("--max-parity-params", type=float, default=3.0,
                   help="skip parity above this many billion parameters (3.0; the fp32 reference is 4 bytes each)")
    p.add_argument("--stream-above", type=float, default=6.0,
                   help="draw the folders of models above this many billion parameters tensor by tensor instead "
                        "of saving a model built in memory (6.0; such weights serve time and memory, not parity)")
    p.add_argument("--work", default=os.environ.get("TOMA_REAL_WORK", "/tmp/toma-real-models"),
                   help="scratch folder for model folders and artifacts, emptied per model (/tmp/toma-real-models)")
    p.add_argument("--out", help="folder for results.json and results.md")
    p.add_argument("--readme",
                   help="markdown page to fill between the real-models markers (docs/real-size-models.md)")
    p.add_argument("--update", action="store_true",
                   help="keep the runs already in --out/results.json (same machine) that this run does not repeat")
    args = p.parse_args(argv)
    if args.readme:
        check_readme(Path(args.readme), BEGIN, END)
    cases = [("flux-dev", tuple(int(n) for n in d.split("+"))) for d in args.flux.split(",") if d]
    cases += [("sdxl-base", None)] if args.sdxl else []
    here = machine(BenchOptions())
    kept = previous(args, here)
    runs = [measure(name, blocks, args) for name, blocks in cases]
    labels = {r["label"] for r in runs}
    runs = [r for r in kept if r["label"] not in labels] + runs
    doc = dict(date=datetime.date.today().isoformat(), machine=here, runs=runs,
               flux_dev_full=extrapolate([r for r in runs if r["model"] == "flux-dev"]))
    doc["passed"] = all(r["ok"] for r in runs)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (Path(args.out) / "results.md").write_text(table(doc))
    if args.readme:
        fill_readme(Path(args.readme), table(doc), BEGIN, END)
    print(json.dumps(doc, indent=2))
    return 0 if doc["passed"] else 1


def measure(name: str, blocks, args) -> dict:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    params = real_configs.parameters(name, blocks)
    label = f"{name} {blocks[0]}+{blocks[1]}" if blocks else name
    log(f"== {label}: {params / 1e9:.2f} B parameters")
    t0 = time.perf_counter()
    streamed = params / 1e9 > args.stream_above
    folder = write_in_child(name, work / "model", blocks, "fp16" if name.startswith("sdxl") else None, streamed)
    run = dict(model=name, blocks=list(blocks) if blocks else None, label=label, date=datetime.date.today().isoformat(),
               params_b=round(params / 1e9, 3),
               write_s=round(time.perf_counter() - t0, 1), folder_gib=gib(du(folder)), ok=True)
    env = dict(os.environ, TOMA_EXPORT_OUTPUT=str(work / "artifacts"))
    height, width = args.size.split("x")
    rc, meta, wall, rss = command(["export", "--model", str(folder), "--height", height, "--width", width], env)
    run["export"] = step(rc, wall, rss, meta and dict(dtype=meta["dtype"], text_len=meta["text_len"],
                                                      gib=gib(du(Path(meta["onnx"]).parent)),
                                                      external_data=meta["external_data"], key=meta["key"]))
    if params / 1e9 <= args.max_build_params and rc == 0:
        rc, meta, wall, rss = command(["build", "--model", str(folder), "--backend", "tensorrt-rtx", "--static",
                                       "--opt-size", args.size], env)
        run["build"] = step(rc, wall, rss, meta and dict(gib=gib(meta["engine_bytes"]), dtype=meta["dtype"],
                                                         reused_export=meta["onnx_key"] == run["export"]["key"]))
    if params / 1e9 <= args.max_parity_params:
        ph, pw = args.parity_size.split("x")
        rc, meta, wall, rss = command(["export", "--model", str(folder), "--height", ph, "--width", pw, "--dtype",
                                       "fp16", "--text-len", str(args.parity_text_len)], env)
        if rc == 0:
            rc, report, wall, rss = command(["validate", "--model", str(folder), "--onnx", meta["onnx"],
                                             "--backends", "onnxruntime", "--steps", str(args.steps)], env)
            run["parity"] = step(rc, wall, rss, report and parity(report))
            run["parity"]["ok"] = bool(report and report["passed"])
        else:
            run["parity"] = step(rc, wall, rss, None)
    run["ok"] = all(run[k]["ok"] for k in ("export", "build", "parity") if k in run)
    shutil.rmtree(work, ignore_errors=True)
    return run


def write_in_child(name: str, folder: Path, blocks, file_variant, streamed: bool) -> Path:
    """Write the random-weight folder in a process of its own. Written here, the weights would stay in this
    process's heap, and a command started from it would report them as its own peak: a child's peak RSS
    (os.wait4) starts from what it inherited at the fork. `streamed`: drawn tensor by tensor
    (real_configs.write_streamed), for models too large to build in memory; time and memory only."""
    call = ("real_configs.write_streamed(sys.argv[1], sys.argv[2], blocks=json.loads(sys.argv[3]))" if streamed else
            "real_configs.write(sys.argv[1], sys.argv[2], blocks=json.loads(sys.argv[3]), "
            "file_variant=json.loads(sys.argv[4]))")
    code = f"import json, sys; from toma_export.models import real_configs; {call}"
    subprocess.run([sys.executable, "-c", code, name, str(folder), json.dumps(list(blocks) if blocks else None),
                    json.dumps(file_variant)], check=True)
    return folder


def command(args: list, env: dict):
    """One toma-export command in its own process: (rc, its --json object, wall s, peak RSS GiB)."""
    log("$ toma-export " + " ".join(args))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "toma_export.cli", *args, "--json"], stdout=subprocess.PIPE,
                            env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    try:
        doc = json.loads(out) if out.strip() else None
    except json.JSONDecodeError:
        doc = None
    return proc.returncode, doc, wall, usage.ru_maxrss / 2 ** 20


def step(rc, wall, rss, fields) -> dict:
    return dict(ok=rc == 0, rc=rc, seconds=round(wall, 1), peak_rss_gib=round(rss, 2), **(fields or {}))


def parity(report: dict) -> dict:
    """The worst step and loop comparison of ONNX Runtime against the fp32 reference."""
    out = {}
    for kind in ("step", "loop"):
        rows = [c for c in report["comparisons"] if c["kind"] == kind and c["backends"][1] == "onnxruntime"]
        if rows:
            worst = max(rows, key=lambda c: c["max_abs"] / max(c["tolerance"], 1e-30))
            out[kind] = dict(max_abs=worst["max_abs"], tolerance=worst["tolerance"], cosine=worst["cosine"],
                             passed=all(c["passed"] for c in rows))
    out["dtype"] = report["dtype"]
    return out


def previous(args, here: dict) -> list:
    """--update: the runs of an earlier results.json from this machine kind."""
    path = Path(args.out or ".") / "results.json"
    if not (args.update and path.is_file()):
        return []
    old = json.loads(path.read_text())
    if old["machine"]["cpu"] != here["cpu"]:
        sys.exit(f"error: {path} was measured on {old['machine']['cpu']}, not this {here['cpu']}; drop --update")
    return old["runs"]


def extrapolate(runs: list) -> dict | None:
    """Full FLUX.1-dev from the measured series: each figure fitted as a + b * parameters (least squares),
    over the runs whose export wrote external data as the full model's does (under 2 GB the file is
    written inline, which costs other memory), or over all runs when fewer than two did."""
    params = real_configs.parameters("flux-dev", FULL_FLUX) / 1e9
    external = [r for r in runs if r.get("export", {}).get("external_data")]
    runs = external if len(external) >= 2 else runs
    out = dict(params_b=round(params, 2), method="least squares a + b * parameters over "
               + ", ".join(r["label"] for r in runs))
    for key, (phase, field) in dict(export_s=("export", "seconds"), export_rss_gib=("export", "peak_rss_gib"),
                                    onnx_gib=("export", "gib"), build_s=("build", "seconds"),
                                    build_rss_gib=("build", "peak_rss_gib"), engine_gib=("build", "gib"),
                                    validate_rss_gib=("parity", "peak_rss_gib"), folder_gib=(None, "folder_gib")).items():
        points = [(r["params_b"], (r.get(phase, {}) if phase else r).get(field)) for r in runs
                  if not phase or r.get(phase, {}).get("ok")]
        points = [(x, y) for x, y in points if y is not None]
        if len(points) >= 2:
            n = len(points)
            mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
            b = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-12)
            out[key] = round(my + b * (params - mx), 1)
    return out if len(out) > 2 else None


def table(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"Measured {doc['date']} on {m['cpu']} ({m['cores']} cores, {m.get('memory_gib')} GiB RAM), random weights in "
             "the real configurations, each command in its own process (`make test-large`).", "",
             "| model | params | export (dtype, 1024 px) | peak RSS | ONNX size | TensorRT-RTX build | engine | "
             "fp16 parity vs fp32 (step / loop max abs, tolerance) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        e, b, p = r["export"], r.get("build"), r.get("parity")
        build = (f"{b['seconds']:.0f} s, {b['peak_rss_gib']:.1f} GiB RSS" if b and b["ok"] else
                 f"failed (rc {b['rc']})" if b else "not run (size)")
        par = ("not run (size)" if not p else f"failed (rc {p['rc']})" if "step" not in p else
               f"{'pass' if p['ok'] else 'FAIL'}: {p['step']['max_abs']:.1e} / "
               f"{p.get('loop', {}).get('max_abs', float('nan')):.1e} ({p['step']['tolerance']:.1e})")
        lines.append(f"| {r['label']} | {r['params_b']:.2f} B | "
                     + (f"{e['seconds']:.0f} s ({e.get('dtype')})" if e["ok"] else f"failed (rc {e['rc']})")
                     + f" | {e['peak_rss_gib']:.1f} GiB | {e.get('gib', 0):.1f} GiB | {build} | "
                     + (f"{b['gib']:.1f} GiB" if b and b["ok"] else "-") + f" | {par} |")
    x = doc.get("flux_dev_full")
    if x:
        build = (f"~{x['build_s']:.0f} s, ~{x['build_rss_gib']:.0f} GiB RSS" if "build_s" in x else "-")
        lines.append(f"| flux-dev 19+38 (extrapolated) | {x['params_b']:.2f} B | ~{x.get('export_s', 0):.0f} s | "
                     f"~{x.get('export_rss_gib', 0):.0f} GiB | ~{x.get('onnx_gib', 0):.0f} GiB | {build} | "
                     f"~{x.get('engine_gib', 0):.0f} GiB | validate: ~{x.get('validate_rss_gib', 0):.0f} GiB RSS |")
    return "\n".join(lines) + "\n"


def du(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gib(n: int) -> float:
    return round(n / 2 ** 30, 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
