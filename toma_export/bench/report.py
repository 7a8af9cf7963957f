"""What `toma-export bench` writes: a markdown table (also pasted into docs/bench.md between markers), a plot
of latency against ratio per block and backend, and the JSON itself."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def table(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} PyTorch / ONNX Runtime threads"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; Python {m['python']}.",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
             f"Command: `{doc['command']}`.", "",
             "| block | backend | method | ratio | median ms | baseline ms | latency ratio | speed-up "
             "| overhead share | rel. L2 vs baseline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        method = r["method"] + (" (default)" if r["default"] and r["method"] == "toma" else "")
        share = "" if r["overhead_share"] is None else f"{100 * r['overhead_share']:.1f} %"
        rel = "" if r["rel_l2_vs_baseline"] is None else f"{r['rel_l2_vs_baseline']:.4f}"
        lines.append(f"| {r['block']} | {r['backend']} | {method} | {r['ratio']:g} | {r['median_ms']:.1f} "
                     f"| {r['baseline_median_ms']:.1f} | {r['latency_ratio']:.3f}x | {r['speedup']:.2f}x "
                     f"| {share} | {rel} |")
    lines += breakdown_table(doc) + amortised_table(doc) + four_way_table(doc)
    if doc["targets"]:
        lines += ["", "Targets (measured, not asserted):", ""]
        for t in doc["targets"]:
            if t["measured"] is None:
                verdict = "not measured in this run"
            elif t["met"]:
                verdict = f"**met**: {t['measured']:g} <= {t['limit']:g}"
            else:
                verdict = f"**missed** by {t['missed_by']:g}: {t['measured']:g} > {t['limit']:g}"
            where = f" ({t['row']})" if t.get("row") else ""
            lines.append(f"- {t['name']}: {verdict}{where}")
    for note in doc.get("notes", []):
        lines.append(f"- Note: {note}")
    return "\n".join(lines) + "\n"


def breakdown_table(doc: dict) -> list[str]:
    """ToMA's overhead part by part, per block, backend and ratio (ms, each part timed alone)."""
    rows = [r for r in doc["results"] if r.get("breakdown")]
    if not rows:
        return []
    lines = ["", "ToMA's own work per block call, part by part (ms, each part timed alone; selection includes "
             "its similarity, which the merge weights share):", "",
             "| block | backend | ratio | layout in | selection (similarity) | weights | merge | unmerge "
             "| layout out | round trips | sum of parts | measured together | share of baseline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["breakdown"]
        lines.append(f"| {r['block']} | {r['backend']} | {r['ratio']:g} | {b['fold_ms']:.2f} "
                     f"| {b['selection_ms']:.2f} ({b['similarity_ms']:.2f}) | {b['weights_ms']:.2f} "
                     f"| {b['merge_ms']:.2f} | {b['unmerge_ms']:.2f} | {b['unfold_ms']:.2f} | {b['round_trips']} "
                     f"| {b['sum_ms']:.2f} | {r['overhead_ms']:.2f} | {100 * r['overhead_share']:.2f} % |")
    return lines


def amortised_table(doc: dict) -> list[str]:
    """Per-step overhead of a denoising loop under each schedule, beside the every-call worst case."""
    rows = [a for a in doc.get("amortised", []) if a["ratio"] == 0.5]
    if not rows:
        return []
    lines = ["", "Amortised over a denoising loop at ratio 0.5 (the real model's default patch; each patched block "
             "counted as the benchmark block):", "",
             "| block | backend | model (groups / patched blocks) | schedule | merged steps | overhead per step "
             "| share of the patched blocks per step | every-call worst case |",
             "|---|---|---|---|---|---|---|---|"]
    for a in rows:
        lines.append(f"| {a['block']} | {a['backend']} | {a['model']} ({a['groups']} / {a['patched_blocks']}) "
                     f"| {a['schedule']} | {a['merged_steps']} of {a['steps']} | {a['overhead_per_step_ms']:.1f} ms "
                     f"| {100 * a['overhead_share_per_step']:.2f} % | {100 * a['every_call_share']:.2f} % |")
    return lines


def four_way_table(doc: dict) -> list[str]:
    """Whether 8-bit and ToMA multiply (`bench --quantize int8`)."""
    rows = doc.get("four_way") or []
    if not rows:
        return []
    lines = ["", "8-bit and ToMA together, one step's median (goal: both >= 0.9 x the product of the two alone):", "",
             "| block | backend | ratio | unquantized ms | ToMA | 8-bit | 8-bit + ToMA | product | share of product |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['backend']} | {r['ratio']:g} | {r['baseline_ms']:.1f} "
                     f"| {r['toma_ms']:.1f} ms ({r['toma_speedup']:.2f}x) | {r['quant_ms']:.1f} ms, {r['mode']} "
                     f"({r['quant_speedup']:.2f}x) | {r['both_ms']:.1f} ms ({r['both_speedup']:.2f}x) "
                     f"| {r['product']:.2f}x | {r['share_of_product']:.2f}{'' if r['multiplies'] else ' (missed)'} |")
    return lines


def plot(doc: dict, path: Path) -> Path:
    """Median latency against ratio (0 = baseline), one panel per block, one line per backend, tomesd as
    a marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["method"] in ("baseline", "toma", "tomesd") and "whole model" not in
            r["block"] and "engine" not in r["block"]]
    names = list(dict.fromkeys(r["block"] for r in rows))
    if not names:
        raise UsageError("no block results to plot")
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["block"] == name]
        for backend in dict.fromkeys(r["backend"] for r in mine):
            line = sorted((r["ratio"], r["median_ms"]) for r in mine
                          if r["backend"] == backend and r["method"] in ("baseline", "toma"))
            (drawn,) = ax.plot(*zip(*line), marker="o", label=f"ToMA, {backend}")
            for r in mine:
                if r["backend"] == backend and r["method"] == "tomesd":   # hollow: backends may overlap
                    ax.plot(r["ratio"], r["median_ms"], marker="s", markersize=9, fillstyle="none",
                            color=drawn.get_color(), linestyle="none", label=f"tomesd, {backend}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("ratio of tokens merged away (0 = baseline)")
        ax.set_ylabel("median latency, ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['machine']['cpu']}, {doc['machine']['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine_kind(doc: dict) -> str:
    """A file-name slug for the run's machine kind, from its CPU (or GPU) model: 'amd-epyc'."""
    m = doc["machine"]
    name = m.get("gpu") or m["cpu"]
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) or "unknown"


def machines_table(folder: Path) -> str:
    """The default-ratio rows of the last run on every machine kind measured (machines/*.json), side by
    side: the same code moves with the machine, so each row names its own."""
    lines = ["| machine | block | backend | baseline ms | ToMA ms | latency ratio | overhead share |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted((Path(folder) / "machines").glob("*.json")):
        doc = json.loads(path.read_text())
        m = doc["machine"]
        label = f"{m.get('gpu') or m['cpu']}, {m['torch_threads']} threads"
        for r in doc["results"]:
            if r["method"] == "toma" and r["default"] and "whole model" not in r["block"]:
                share = "" if r["overhead_share"] is None else f"{100 * r['overhead_share']:.1f} %"
                lines.append(f"| {label} | {r['block']} | {r['backend']} | {r['baseline_median_ms']:.1f} "
                             f"| {r['median_ms']:.1f} | {r['latency_ratio']:.3f}x | {share} |")
    return "\n".join(lines) + "\n"


def write(doc: dict, folder: Path) -> list[Path]:
    """results.json, results.md and latency.png in `folder`, and the run kept as machines/<kind>.json
    (the last run per machine kind; docs/bench.md shows them side by side)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (folder / "results.md").write_text(table(doc))
    kept = folder / "machines" / f"{machine_kind(doc)}.json"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(json.dumps(doc, indent=2) + "\n")
    return [folder / "results.json", folder / "results.md", plot(doc, folder / "latency.png"), kept]


def check_readme(readme: Path, begin: str = BEGIN, end: str = END) -> str:
    """The page's text (README.md or a docs/ page), or a one-line error when it has no section to fill (checked
    before a long run)."""
    text = Path(readme).read_text()
    if begin not in text or end not in text:
        raise UsageError(f"{readme} has no {begin} ... {end} section to fill; add the two markers where the "
                         "results table belongs")
    return text


def fill_readme(readme: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between two markers of the page with `body`."""
    head, rest = check_readme(readme, begin, end).split(begin, 1)
    Path(readme).write_text(f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}")


def update_readme(readme: Path, doc: dict, plot_path: Path) -> None:
    """Replace the text between the bench markers with every machine kind's default rows, then this run's
    full table and plot."""
    rel = Path(plot_path).resolve().relative_to(readme.resolve().parent)
    m = doc["machine"]
    body = (f"The figures move with the machine: a faster baseline makes ToMA's fixed cost a larger share. "
            f"Default configuration (ratio 0.5), last run per machine kind:\n\n"
            f"{machines_table(Path(plot_path).parent)}\n"
            f"Last run, on {m.get('gpu') or m['cpu']}:\n\n{table(doc)}\n"
            f"![median latency against ratio]({rel.as_posix()})")
    fill_readme(readme, body)
