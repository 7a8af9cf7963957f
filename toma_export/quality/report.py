"""What a sweep shows a person: pareto.png (speed-up against fidelity per ratio), grid.png (prompts x ratios at
the same seed) and report.html (both pictures and the table)."""
from __future__ import annotations

import html as html_lib
from pathlib import Path

from PIL import Image, ImageDraw

COLUMNS = (("ratio", "ratio", "{:.2f}"), ("cache", "cache", "{}"), ("quantize", "8-bit", "{}"), ("step_ms", "network ms/step (median)", "{:.2f}"),
           ("speedup", "speed-up per step", "{:.2f}x"), ("computed_steps", "steps computed", "{:.1f}"),
           ("cached_ms", "network ms per cached step", "{:.2f}"),
           ("network_ms", "network ms/image", "{:.1f}"), ("network_speedup", "network speed-up per image", "{:.2f}x"),
           ("image_s", "s/image (end to end)", "{:.3f}"),
           ("image_speedup", "speed-up per image", "{:.2f}x"), ("accuracy", "prompt accuracy", "{:.1%}"),
           ("attributes.colour", "colour right", "{:.1%}"), ("attributes.shape", "shape right", "{:.1%}"),
           ("attributes.background", "background right", "{:.1%}"),
           ("fidelity", "judge fidelity", "{:.4f}"), ("frechet", "judge Fréchet", "{:.3f}"),
           ("clip_t", "CLIP-T", "{:.2f}"), ("dino", "DINO fidelity", "{:.4f}"),
           ("control_iou", "control IoU", "{:.3f}"), ("control_centroid", "control centroid", "{:.3f}"))


def value(row: dict, key: str):
    """A row's figure; "attributes.shape" reads into the per-attribute accuracies."""
    head, _, tail = key.partition(".")
    found = row.get(head)
    return found.get(tail) if tail and isinstance(found, dict) else found


def columns(rows: list) -> list:
    """The COLUMNS a sweep's rows have."""
    return [c for c in COLUMNS if c[0].split(".")[0] in rows[0]]


def row_label(row: dict) -> str:
    """'ratio 0.5', or 'ratio 0.5 + fbcache:0.1 + int8' in a sweep with caches or 8-bit rows."""
    extras = [row.get(k) for k in ("cache", "quantize")]
    return f"ratio {row['ratio']:g}" + "".join(f" + {e}" for e in extras if e and e != "none")


def speed_axis(result: dict) -> tuple[str, str]:
    """(row key, label) of the speed plotted: per step, or per image where a step cache skips steps."""
    if "network_speedup" in result["rows"][0]:
        return "network_speedup", "network speed-up per image (vs ratio 0, no cache)"
    return "speedup", "speed-up per denoising step (network, vs ratio 0)"


def quality_axis(result: dict) -> tuple[str, str] | None:
    """(row key, label) of the quality figure plotted against speed: fidelity to ratio 0."""
    for key in ("fidelity", "dino"):
        if key in result["rows"][0]:
            return key, {"fidelity": "judge fidelity (stand-in for DINO)", "dino": "DINO fidelity"}[key]
    return None


def pareto(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    axis = quality_axis(result)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    speed = speed_axis(result)
    xs = [r[speed[0]] for r in rows]
    ys = [r[axis[0]] for r in rows] if axis else [r["image_speedup"] for r in rows]
    ax.plot(xs, ys, "o" if "cache" in rows[0] or "quantize" in rows[0] else "-o", color="#3060c0")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(row_label(r).removeprefix("ratio "), (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel(speed[1])
    ax.margins(x=0.2, y=0.1)                      # room for the labels right of the points
    ax.set_ylabel(axis[1] if axis else "speed-up per image (end to end)")
    ax.set_title(f"{result['model']} on {result['backend']}, {result['height']}x{result['width']}, "
                 f"{result['steps']} steps", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(fig.savefig, path)
    plt.close(fig)


def grid(result: dict, path: Path, max_prompts: int = 8) -> None:
    """Rows: up to max_prompts prompts spread evenly over the list (the first seed of each; with a ControlNet, its
    samples, their control image first); columns: the sweep's rows (ratios, x caches, x 8-bit modes)."""
    rows = result["rows"]
    controls = result.get("control_images")
    firsts = list(range(len(result["jobs"]))) if controls else \
        [i for i, (_, seed) in enumerate(result["jobs"]) if seed == 0]
    if len(firsts) > max_prompts:
        firsts = [firsts[round(k * (len(firsts) - 1) / max(1, max_prompts - 1))] for k in range(max_prompts)]
    cell = 96 if "cache" in rows[0] or "quantize" in rows[0] else 128
    label_w, head = 260, 36
    left = label_w + (cell + 4 if controls else 0)
    sheet = Image.new("RGB", (left + len(rows) * (cell + 4), head + len(firsts) * (cell + 4)), "white")
    pen = ImageDraw.Draw(sheet)
    speed = speed_axis(result)[0]
    if controls:
        pen.text((label_w + 4, 4), "control", fill="black")
    for c, row in enumerate(rows):
        name, _, cache = row_label(row).partition(" + ")
        text = name + (f"  {row[speed]:.2f}x" if c else "") + (f"\n{cache}" if cache else "")
        pen.text((left + c * (cell + 4) + 4, 4), text, fill="black")
    for r, i in enumerate(firsts):
        pen.text((4, head + r * (cell + 4) + cell // 2 - 6), _short(result["jobs"][i][0]), fill="black")
        if controls:
            sheet.paste(controls[i].resize((cell, cell), Image.Resampling.LANCZOS), (label_w, head + r * (cell + 4)))
        for c, row in enumerate(rows):
            image = result["images"][c][i].resize((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(image, (left + c * (cell + 4), head + r * (cell + 4)))
    write_atomic(lambda p: sheet.save(p, format="PNG"), path)


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def html(result: dict, files: dict, path: Path) -> None:
    rows = result["rows"]
    cols = columns(rows)
    head = "".join(f"<th>{html_lib.escape(label)}</th>" for _, label, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r, k, fmt)}</td>" for k, _, fmt in cols) + "</tr>" for r in rows)
    names = "".join(f"<li><b>{html_lib.escape(k)}</b>: {html_lib.escape(v)}</li>"
                    for k, v in result["metric_names"].items())
    title = (f"ToMA sweep: {result['model']} on {result['backend']}, {result['height']}x{result['width']} px, "
             f"{result['steps']} steps, {len(result['prompts'])} prompts x {result['seeds']} seed(s)")
    text = f"""<!doctype html><meta charset="utf-8"><title>{html_lib.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:4px 10px;text-align:right}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f2f2f2}}</style>
<h1>{html_lib.escape(title)}</h1>
<table><tr>{head}</tr>{body}</table>
<ul>{names}</ul>
<p>Ratio 0 without a cache is the unmerged network and the reference of every quality figure.</p>
<h2>Speed against quality</h2><img src="{Path(files['pareto']).name}" alt="pareto">
"""
    if "grid" in files:
        text += f"""<h2>Prompts x ratios (same seed)</h2><img src="{Path(files['grid']).name}" alt="grid">\n"""
    write_atomic(lambda p: p.write_text(text), path)


def cell(row: dict, key: str, fmt: str) -> str:
    found = value(row, key)
    return "-" if found is None else fmt.format(found)


def write_atomic(writer, path: Path) -> None:
    """writer(temporary path) beside the final name, then rename: nothing half-written under it. The file gets the
    umask's usual mode whatever the writer gave it (safetensors writes 0600)."""
    from ..artifacts import usual_mode

    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    writer(tmp)
    usual_mode(tmp)
    tmp.replace(path)
