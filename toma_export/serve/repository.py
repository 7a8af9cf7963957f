"""`toma-export export-repo`: a Triton Inference Server model repository for an engine from `toma-export build`.

It writes `REPO/<name>/config.pbtxt` and `REPO/<name>/1/model.plan` (a byte copy of engine.plan). The config
is generated from engine.json, which records every engine input and output with its dtype and its shape
(symbolic names for dynamic axes), so nothing has to load the engine, and that needs no GPU.

Batching: Triton can own the batch axis (`max_batch_size > 0`, dims without the batch axis) only when every
input and output starts with it. ToMA engines never qualify, because `toma_recompute` (int32 [1]) and FLUX's
`txt_ids` have no batch axis. So the default is `max_batch_size: 0`. The dims then keep the batch axis
(-1 when dynamic), a request carries its own batch (a CFG pair is one request of batch 2), and the engine's
optimization profile bounds it. Triton needs non-empty dims, so a 0-d tensor is sent as `[1]` and reshaped to
`[]` (the `reshape` field).

The model is stateless for Triton. The client owns the ToMA schedule: it carries `toma_dst_out.*` back as
`toma_dst.*` and sets `toma_recompute`. So any instance can serve any step, and no sequence batcher is needed.

Triton's TensorRT backend deserialises full TensorRT plans. It cannot load a TensorRT-RTX engine, so those
are refused unless --allow-tensorrt-rtx is given. That flag is for tests and custom backends.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from ..artifacts import Artifact, link_or_copy, staged_dir, writable_dir
from ..errors import UsageError

# numpy dtype names (as engine.json records them) -> Triton's ModelConfig DataType
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL"}
BATCH_AXIS = "batch"          # the symbolic name the model specs give the batch axis
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RepositoryError(UsageError):
    """A one-line refusal: bad engine.json, unservable engine, existing model folder, bad option."""


def load_engine(path) -> tuple[dict, Path]:
    """engine.json (or its folder) -> (metadata, the engine.plan beside it).

    The plan is taken from the folder, not from the absolute path recorded at build time, so that a
    moved or copied engine folder still works."""
    artifact = Artifact.load(path, "engine")
    return artifact.meta, artifact.path.with_name("engine.plan")


def _dims(shape) -> list[int]:
    """Symbolic (dynamic) axes become -1, fixed axes stay."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _batch_limit(meta: dict) -> int:
    """The largest batch Triton may form, or a RepositoryError naming why it may not own the batch axis."""
    for t in meta["inputs"] + meta["outputs"]:
        if not t["shape"] or t["shape"][0] != BATCH_AXIS:
            raise RepositoryError(
                f"--max-batch-size needs every input and output to start with the batch axis, but "
                f"{t['name']} has shape {t['shape']}; keep the default 0 (each request carries its batch)")
    return min(p["max"][0] for p in meta["profiles"].values())     # every profiled input starts with batch


def _tensor(t: dict, batched: bool) -> str:
    if t["dtype"] not in TRITON_TYPES:
        raise RepositoryError(f"{t['name']} has dtype {t['dtype']}, which Triton's TensorRT backend does not "
                              f"take (it takes {', '.join(TRITON_TYPES)})")
    dims = _dims(t["shape"])[1 if batched else 0:]
    lines = [f"    name: {json.dumps(t['name'])}", f"    data_type: {TRITON_TYPES[t['dtype']]}",
             f"    dims: [ {', '.join(map(str, dims or [1]))} ]"]
    if not dims:                           # Triton wants non-empty dims: a scalar travels as [1]
        lines.append("    reshape: { shape: [ ] }")
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_text(meta: dict, name: str, max_batch_size: int = 0, instances: int = 1) -> str:
    """The config.pbtxt (protobuf text of Triton's ModelConfig) for a built engine."""
    if max_batch_size < 0 or instances < 1:
        raise RepositoryError("--max-batch-size must be 0 or more and --instances 1 or more")
    if max_batch_size > 0:
        limit = _batch_limit(meta)
        if max_batch_size > limit:
            raise RepositoryError(f"--max-batch-size {max_batch_size} exceeds the engine's batch range (profile "
                                  f"max {limit}); rebuild with a larger profile or ask for at most {limit}")
    head = [f"# written by `toma-export export-repo` from {meta['model']}: {meta['backend']} "
            f"{meta['backend_version']}, selection {meta.get('selection')}, dtype {meta.get('dtype')}",
            "# tritonserver must link exactly this TensorRT version (engines are not portable across versions)",
            "# and run on the GPU model the engine was built on."]
    if meta["profiles"]:
        head.append("# optimization profile 0 (inputs outside it are rejected), min / opt / max:")
        head += [f"#   {n}: {p['min']} / {p['opt']} / {p['max']}" for n, p in meta["profiles"].items()]
    body = [f"name: {json.dumps(name)}", 'platform: "tensorrt_plan"', f"max_batch_size: {max_batch_size}"]
    for kind, tensors in (("input", meta["inputs"]), ("output", meta["outputs"])):
        body.append(f"{kind} [\n" + ",\n".join(_tensor(t, max_batch_size > 0) for t in tensors) + "\n]")
    group = [f"    count: {instances}", "    kind: KIND_GPU"]
    if meta["profiles"]:
        group.append('    profile: [ "0" ]')    # the one profile `build` adds; Triton's default, made explicit
    body.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    return "\n".join(head) + "\n" + "\n".join(body) + "\n"


def export_repo(engine, out, name: str | None = None, max_batch_size: int = 0, instances: int = 1,
                force: bool = False, allow_rtx: bool = False, warn=None) -> Path:
    """Write REPO/<name>/{config.pbtxt, 1/model.plan}; returns the model folder.

    The folder is staged under a temporary sibling and renamed into place, so a crash leaves no
    half-written model that tritonserver would try to load."""
    warn = warn or (lambda msg: print(f"toma-export: warning: {msg}", file=sys.stderr))
    meta, plan = load_engine(engine)
    if meta.get("weightless"):
        raise RepositoryError(f"{plan} is a weightless plan ({meta['weightless']}), which Triton's TensorRT backend "
                              "would run without its weights (it never refits); build the engine without --weightless "
                              "for a repository")
    rtx = meta["backend"] == "tensorrt-rtx"
    unservable = (f"{plan} is a TensorRT-RTX engine, which Triton's TensorRT backend cannot load (it runs full "
                  "TensorRT plans)")
    if rtx and not allow_rtx:
        raise RepositoryError(f"{unservable}; build one with `toma-export build --backend tensorrt` on the serving "
                              "GPU, or pass --allow-tensorrt-rtx to write the repository anyway")
    name = name or Path(meta["model"]).name
    if not _NAME.fullmatch(name):
        raise RepositoryError(f"model name {name!r} is not a plain folder name (letters, digits, _ . -); "
                              "pass --name")
    text = config_text(meta, name, max_batch_size, instances)
    final = writable_dir(out) / name
    if final.exists() and not force:
        raise RepositoryError(f"{final} already exists; pass --force to replace it, or choose another --name")
    if rtx:
        warn(f"{unservable}; writing the repository anyway (--allow-tensorrt-rtx)")
    with staged_dir(final) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(plan, tmp / "1" / "model.plan")
        (tmp / "config.pbtxt").write_text(text)
    return final


# -- the pipeline model (Python backend): prompt -> image around the exported network --
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


def pipeline_config_text(meta: dict, kind: str, name: str, instances: int, kind_of_instances: str,
                         max_requests: int, limits=None, cache=None, controlnets=(), control_modes=()) -> str:
    """config.pbtxt of the pipeline model. `max_requests`: how many requests one pipeline call may batch
    (the export's largest batch over the default CFG batch); 1 turns dynamic batching off. `limits`: what one
    request may ask for (triton_model.Limits), written as parameters; `cache` the First-Block Cache too.
    `controlnets`: (name, default scale) per ControlNet, which add the control_image and control_scale inputs; a
    config without them is what it was before ControlNets were served. `control_modes`: a Union ControlNet's mode
    per ControlNet (None for the others), fixed for the model (parameter controlnet_modes)."""
    from .triton_model import Limits

    limits = limits or Limits()
    if instances < 1:
        raise RepositoryError("--instances must be 1 or more")
    network = "ONNX Runtime" if kind == "onnx" else f"{meta['backend']} {meta['backend_version']}"
    head = [f"# written by `toma-export export-repo`: text-to-image with {meta['model']} (dtype {meta.get('dtype')}), "
            f"the network run by {network} inside this Python-backend model (toma_export.serve.triton_model)",
            "# inputs per request: prompt BYTES, height/width/steps/seed INT64, guidance FP32 (optional), each [1];",
            "# output image UINT8 [H, W, 3]; the batch axis Triton adds makes them [1, ...] on the wire"]
    if max_requests > 1:
        head.append(f"# dynamic batching: requests of equal size, steps and guidance run as one pipeline batch of up "
                    f"to {max_requests} (the export's batch range over the CFG batch); ToMA destinations stay per "
                    "request")
    elif controlnets:
        head.append("# no dynamic batching: a pipeline call takes one control image per ControlNet for its whole "
                    "batch, so requests run one at a time; scale with --instances")
    else:
        head.append("# no dynamic batching: the export takes one image per network call (a static export, or a "
                    "batch range no larger than the CFG batch); scale with --instances")
    ranges = (meta.get("ranges") or {}).get("sizes")
    sizes = (f"sizes {'x'.join(map(str, ranges[0]))} to {'x'.join(map(str, ranges[-1]))} px" if meta.get("dynamic")
             and ranges else f"size {meta.get('height')}x{meta.get('width')} px only" if not meta.get("dynamic")
             else "a dynamic size")
    head.append(f"# the export takes {sizes}; other sizes get an error response")
    if cache is not None:
        head.append(f"# First-Block Cache ({cache}): the head runs every step, the tail only where the head's output "
                    "changed by more than the threshold (decided per batch, so requests run one at a time); the "
                    "cache parameter below sets it")
    if controlnets:
        head.append("# ControlNets, each in 1/controlnet-<i>: " + ", ".join(
            f"{i} {n} (scale {s:g})" for i, (n, s) in enumerate(controlnets)))
        head.append(f"# control_image BYTES [{len(controlnets)}]: one PNG or JPEG per ControlNet, in that order (modes "
                    f"RGB, L, 1, P without transparency; at most {limits.max_control_bytes} bytes and "
                    f"{limits.max_control_pixels} pixels each; resized to the image size); control_scale FP32 "
                    f"[{len(controlnets)}] optional, default the scales above (parameter controlnet_scales)")
    head += ["# every request is checked before any work (HTTP 400 / INVALID_ARGUMENT otherwise): steps "
             f"1..{limits.max_steps}, guidance 0..{limits.max_guidance:g},",
             f"# seed 0..2^63-1, a prompt of at most {limits.max_prompt_bytes} UTF-8 bytes; a run stops when its "
             f"client cancels or after max_seconds",
             f"# ({limits.max_seconds:g} s; a request may send a smaller max_seconds). The parameters below set "
             "these limits.",
             "# The server has no authentication: `toma-export serve` listens on 127.0.0.1 unless --address says "
             "otherwise; to expose it,",
             "# put an authenticating reverse proxy in front, or pass Triton's --http-restricted-api / "
             "--grpc-restricted-protocol (toma-export serve --server-arg)"]

    def scalar(n, t, extra="", dims=1):
        return f"  {{\n    name: {json.dumps(n)}\n    data_type: {t}\n    dims: [ {dims} ]{extra}\n  }}"

    inputs = [scalar("prompt", "TYPE_STRING")] + [scalar(n, "TYPE_INT64") for n in ("height", "width", "steps", "seed")]
    inputs += [scalar(n, "TYPE_FP32", "\n    optional: true") for n in ("guidance", "max_seconds")]
    if controlnets:          # [-1]: the model counts the images itself, naming what it takes
        inputs += [scalar("control_image", "TYPE_STRING", dims=-1),
                   scalar("control_scale", "TYPE_FP32", "\n    optional: true", dims=-1)]
    body = [f"name: {json.dumps(name)}", 'backend: "python"', f"max_batch_size: {max(1, max_requests)}",
            "input [\n" + ",\n".join(inputs) + "\n]",
            'output [\n  {\n    name: "image"\n    data_type: TYPE_UINT8\n    dims: [ -1, -1, 3 ]\n  }\n]',
            f"instance_group [\n  {{\n    count: {instances}\n    kind: {KINDS[kind_of_instances]}\n  }}\n]"]
    if max_requests > 1:
        body.append("dynamic_batching {\n  max_queue_delay_microseconds: 20000\n}")
    extra = {"cache": str(cache)} if cache is not None else {}
    if controlnets:
        extra["controlnet_scales"] = ",".join(str(float(s)) for _, s in controlnets)
    if any(m is not None for m in control_modes):
        extra["controlnet_modes"] = ",".join("none" if m is None else str(m) for m in control_modes)
        head.append("# a Union ControlNet's mode per ControlNet, for every request: parameter controlnet_modes")
    for key, value in {"network_kind": kind, **limits.parameters(control=bool(controlnets)), **extra}.items():
        body.append(f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}')
    return "\n".join(head) + "\n" + "\n".join(body) + "\n"


def _copy_artifact(artifact, dest: Path) -> None:
    """The export's or engine's folder files that loading needs (hard links where the filesystem allows)."""
    dest.mkdir(parents=True)
    folder = artifact.path.parent
    names = (["engine.json", "engine.plan"] if artifact.kind == "engine" else
             ["toma.json", "model.onnx"] + list((artifact.meta.get("weights") or {}).get("files", [])) +
             [p.name for p in folder.iterdir() if p.name.startswith("model.onnx.") or p.suffix == ".data"])
    for n in dict.fromkeys(names):
        if (folder / n).is_file():
            link_or_copy(folder / n, dest / n)


def max_requests(meta: dict) -> int:
    """Requests one pipeline call can batch: the export's largest batch over the default CFG batch."""
    from .. import models

    spec = models.get(meta["model"])
    first = meta["inputs"][0]
    profile = (meta.get("profiles") or {}).get(first["name"])
    batch = profile["max"][0] if profile else first["shape"][0]
    return max(1, int(batch) // spec.cfg_batch(spec.default_guidance)) if meta.get("dynamic") else 1


def export_pipeline(artifact, out, name: str, instances: int = 1, kind: str = "cpu", force: bool = False,
                    baseline=None, check_free=(), limits=None, cache=None, controlnets=(), control_modes=()) -> Path:
    """Write REPO/<name>/{config.pbtxt, 1/model.py, 1/network/...}: the pipeline model (staged, renamed).
    `check_free`: other model folders this export will write, refused together when they exist. `cache`: a
    First-Block Cache, for a split export's tail (its head is copied beside it, under the name the tail records).
    `controlnets`: (export, its baseline or None, default scale) per ControlNet (`controlnet_exports`), copied
    into 1/controlnet-<i>; the network must take their residuals; `control_modes` a Union's mode per ControlNet."""
    from ..artifacts import Artifact
    from .triton_model import BASELINE, MODEL_PY, NETWORK, control_folder

    artifact = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    base = None if baseline is None else Artifact.load(baseline)
    if kind not in KINDS:
        raise RepositoryError(f"--kind must be cpu or gpu, got {kind!r}")
    if artifact.kind == "engine" and kind == "cpu":
        raise RepositoryError("a TensorRT engine runs on a GPU: pass --kind gpu (or export the repository from an "
                              "ONNX export with --onnx to serve on CPU)")
    if not _NAME.fullmatch(name):
        raise RepositoryError(f"model name {name!r} is not a plain folder name (letters, digits, _ . -); pass --name")
    check_control(artifact, bool(controlnets))
    control = artifact.meta.get("control")
    if controlnets and base is not None and base.meta.get("control") != control:
        raise RepositoryError(f"{base.name} takes no ControlNet residuals, unlike {artifact.name}; pass the baseline "
                              "exported with the same --controlnet")
    from .network import head_of

    head = head_of(artifact, cache)
    # First-Block Cache decides for a whole batch (diffusers' rule averages over it): requests are not batched
    # together, so that one request's steps never depend on another's; nor are requests with control images (one
    # per ControlNet for a whole pipeline call)
    batchable = max_requests(artifact.meta) if cache is None and not controlnets else 1
    text = pipeline_config_text(artifact.meta, artifact.kind, name, instances, kind, batchable, limits, cache,
                                [(cn.model, scale) for cn, _, scale in controlnets], control_modes)
    final = writable_dir(out) / name
    for folder in (final, *check_free):
        if folder.exists() and not force:
            raise RepositoryError(f"{folder} already exists; pass --force to replace it, or choose another --name")
    with staged_dir(final) as tmp:
        (tmp / "1").mkdir()
        _copy_artifact(artifact, tmp / "1" / NETWORK)
        if head is not None:
            _copy_artifact(head, tmp / "1" / artifact.meta["head"])
        if base is not None:
            _copy_artifact(base, tmp / "1" / BASELINE)
        for i, (cn, cn_base, _) in enumerate(controlnets):
            _copy_artifact(cn, tmp / "1" / control_folder(i))
            if cn_base is not None:
                _copy_artifact(cn_base, tmp / "1" / control_folder(i, baseline=True))
        (tmp / "1" / "model.py").write_text(MODEL_PY)
        (tmp / "config.pbtxt").write_text(text)
    return final


# -- ControlNets: their exports beside the network's, checked against it --
MATCHING = ("dtype", "dynamic", "batch", "height", "width", "ranges", "text_len")   # what a ControlNet shares


def controlnet_exports(network, names, unmerged: bool = False) -> list[tuple]:
    """(export, its baseline or None) per ControlNet, for a network export that takes their residuals. A name that
    is an export (model.onnx, toma.json or their folder) is taken as it is; any other name (a registered ControlNet
    or a diffusers folder) is looked up among the exports beside the network's, where `export --controlnet` writes
    them: its ToMA settings the network's (none when `unmerged`), and its sizes, batch, dtype and text length. A
    ToMA ControlNet whose schedule leaves steps unmerged gets its baseline from beside it too. Nothing is exported
    here: export-repo places exports, it never makes them."""
    from ..artifacts import Artifact
    from .pipeline import needs_baseline

    if network.kind != "onnx":
        raise RepositoryError("ControlNets are served through ONNX Runtime so far: pass the network's export that "
                              "takes their residuals with --onnx (docs/controlnet.md)")
    check_control(network, True)
    control = network.meta["control"]
    wanted = None if unmerged else network.config
    found = []
    for name in names:
        given = Path(name).expanduser()
        if given.is_file() or (given / "toma.json").is_file():
            cn = Artifact.load(given, "onnx")
            if unmerged and cn.config is not None:
                raise RepositoryError(f"{cn.name} has ToMA; drop --controlnet-unmerged or pass the ControlNet's export "
                                      "without ToMA")
        else:
            _check_name(network, name, control)
            cn = _beside(network, name, wanted)
            if cn is None:
                toma = "without ToMA" if wanted is None else "with the network's ToMA"
                flag = " --controlnet-unmerged" if unmerged else ""
                raise RepositoryError(
                    f"no export of {name} beside {network.name} fits it ({toma}, the same size, batch, dtype and text "
                    f"length); export them together with `toma-export export --model {network.model} --controlnet "
                    f"{name}{flag}` and the network's options, or pass the ControlNet's export folder")
        _check_controlnet(network, cn, control)
        base = None
        if cn.config is not None and needs_baseline(cn.config):
            base = _beside(cn, cn.model, None)
            if base is None:
                raise RepositoryError(f"{cn.name}: its ToMA schedule (merge_steps {cn.config.merge_steps!r}) leaves "
                                      "steps unmerged, which need its export without ToMA beside it; export it with "
                                      "--no-toma too")
        found.append((cn, base))
    return found


def check_control(network, with_controlnets: bool) -> None:
    """A network that takes ControlNet residuals is served with its ControlNets, and only such a network is."""
    control = network.meta.get("control")
    if control and not with_controlnets:
        raise RepositoryError(f"{network.name} takes the residuals of ControlNets ({control[0]}, {control[1]} "
                              "residuals); pass its ControlNets with --controlnet NAME[:SCALE]")
    if with_controlnets and not control:
        raise RepositoryError(f"{network.name} takes no ControlNet residuals; export the network with its ControlNets "
                              "(toma-export export --controlnet NAME) and pass that export with --onnx")


def _beside(artifact, model: str, config):
    """The ControlNet export of `model` with ToMA settings `config` among the exports in `artifact`'s output folder
    that share its sizes, batch, dtype and text length; None when there is none."""
    from ..artifacts import Artifact

    for folder in sorted(artifact.path.parent.parent.iterdir()):
        meta_file = folder / "toma.json"
        if folder.name.startswith(".") or not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if not (_same_model(meta.get("model"), model) and meta.get("residuals")) or \
                any(meta.get(k) != artifact.meta.get(k) for k in MATCHING):
            continue
        candidate = Artifact.load(folder, "onnx")
        if candidate.config == config:
            return candidate
    return None


def _check_name(network, name: str, control) -> None:
    """A ControlNet named (not an export) gives the residuals the network takes; a name the registry does not know
    is left to the search, which says what to export."""
    from .. import models
    from ..errors import ToMAExportError

    try:
        spec = models.get(name)
    except ToMAExportError:
        return
    layout = spec.residual_layout()
    if not layout:
        raise RepositoryError(f"{name} is not a ControlNet (a {spec.family} network); --controlnet takes ControlNets "
                              "or their exports")
    if list(layout) != list(control):
        raise RepositoryError(f"{name} gives residuals {list(layout)}, but {network.name} takes {list(control)}; pass "
                              "a ControlNet of the network's layout")


def _same_model(recorded, name: str) -> bool:
    """A registered name as it is; a diffusers folder however it was spelled (relative, ~, a link)."""
    if recorded == name:
        return True
    folders = [Path(str(p)).expanduser() for p in (recorded, name)]
    return all(f.is_dir() for f in folders) and folders[0].resolve() == folders[1].resolve()


def _check_controlnet(network, cn, control) -> None:
    if not cn.meta.get("residuals"):
        raise RepositoryError(f"{cn.name} is not a ControlNet export (it gives no residuals); pass the export that "
                              "`toma-export export --controlnet NAME` writes for the ControlNet, or its name")
    if list(cn.meta["residuals"]) != list(control):
        raise RepositoryError(f"{cn.name} gives residuals {list(cn.meta['residuals'])}, but {network.name} takes "
                              f"{list(control)}; pass a ControlNet of the network's layout")
    differ = [k for k in MATCHING if cn.meta.get(k) != network.meta.get(k)]
    if differ:
        k = differ[0]
        raise RepositoryError(f"{cn.name} does not fit {network.name}: {k} {cn.meta.get(k)!r} vs "
                              f"{network.meta.get(k)!r}; export both with the same options (export --controlnet)")
