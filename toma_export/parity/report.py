"""The verdict for people: the table `validate` prints and the report folder (JSON, text, error plot)."""
from __future__ import annotations

import json
from pathlib import Path


def table(report: dict) -> str:
    """The human-readable verdict."""
    lines = [f"reference: {report['reference']}",
             f"{'comparison':<34} {'size':>9} {'step':>4} {'max abs':>10} {'p99 abs':>10} {'cosine':>9} "
             f"{'tolerance':>10}  result"]
    for c in report["comparisons"]:
        p99 = f"{c['p99_abs']:.3g}" if c["p99_abs"] is not None else "-"
        verdict = "ok" if c["passed"] else ("FAIL" + (f" (NaN {c['nan']}, Inf {c['inf']})" if c["nan"] or c["inf"]
                                                      else ""))
        label = ' vs '.join(c['backends']) + ' ' + c['kind'] + (f" {c['graph']}" if c.get("graph") else "")
        lines.append(f"{label:<34} {c['size']:>9} {c['step']:>4} "
                     f"{c['max_abs']:>10.3g} {p99:>10} {c['cosine']:>9.6f} {c['tolerance']:>10.3g}  {verdict}")
    for s in report["selection"]:
        lines.append(f"selection {s['backend']:<24} {s['size']:>9}  identical picks {s['identical']:.1%}, objective "
                     f"ratio {s['objective_ratio']:.6f} (>= {s['min_objective_ratio']})  "
                     f"{'ok' if s['passed'] else 'FAIL'}")
    for f in report["fidelity"]:
        lines.append(f"ToMA fidelity {f['size']}, {f['steps']} steps: final latents {f['relative_l2']:.2%} relative L2 "
                     f"from the model without ToMA (cosine {f['cosine']:.4f}); reported, not judged")
    for q in report.get("quantization") or []:
        loop = (f"; after {q['steps']} steps {q['loop_relative_l2']:.2%} (cosine {q['loop_cosine']:.4f})"
                if "steps" in q else "")
        lines.append(f"{report['quantize']['mode']} cost {q['size']}: one step {q['step_relative_l2']:.2%} relative L2 "
                     f"from the unquantized network{loop}; reported, not judged")
    for b in report.get("bisect", []):
        graph = f"first graph out of tolerance: {b['first_failing_graph']}, " if "first_failing_graph" in b else ""
        lines.append(f"bisect {b['backend']} {b['size']}: {graph}first block out of tolerance: "
                     f"{b['first_failing_block'] or 'none (the error comes after the transformer blocks)'}")
    for backend, reason in report["skipped"].items():
        lines.append(f"{backend}: skipped ({reason})")
    if report.get("nothing_compared"):
        lines.append(f"nothing compared: {report['nothing_compared']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def write_report(report: dict, folder) -> list[str]:
    """report.json, report.txt and errors.png (error per step per backend) in `folder`; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.txt").write_text(table(report) + "\n")
    files = [str(folder / "report.json"), str(folder / "report.txt")]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return files
    fig, ax = plt.subplots(figsize=(7, 4))
    series = {}
    for c in report["comparisons"]:
        if c["kind"] == "loop":
            series.setdefault((c["backends"][1], c["size"]), []).append((c["step"], c["max_abs"] / max(c["scale"], 1e-30)))
    for (backend, size), points in sorted(series.items()):
        steps, errs = zip(*sorted(points))
        ax.semilogy(steps, [max(e, 1e-12) for e in errs], marker="o", label=f"{backend} {size}")
    step_errs = [(c["backends"][1], c["size"], c["max_abs"] / max(c["scale"], 1e-30))
                 for c in report["comparisons"] if c["kind"] == "step"]
    for backend, size, err in step_errs:
        if (backend, size) not in series:
            ax.semilogy([0], [max(err, 1e-12)], marker="s", label=f"{backend} {size} (one step)")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("denoising step")
    ax.set_ylabel("max |candidate - reference| / max |reference|")
    ax.set_title(f"{report['model']} {report['dtype']}: error against the fp32 PyTorch reference")
    ax.grid(True, which="both", alpha=0.3)
    if series or step_errs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "errors.png", dpi=100)
    plt.close(fig)
    return files + [str(folder / "errors.png")]
