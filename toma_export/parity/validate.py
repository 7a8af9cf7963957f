"""`toma-export validate`: is an exported graph or engine as accurate as the PyTorch ToMA reference?

The fp32 PyTorch ToMA model is the reference for every candidate (ONNX Runtime on CPU computes many fp16
ops in fp32, so an fp16 run is never a reference). Downstream parity is measured with destinations forced
identical (the graphs take them as inputs); selection is judged separately, by the share of identical
picks and the candidate's facility-location objective relative to the reference's, so near-ties neither
masquerade as bugs nor hide them. A whole denoising loop with the model's real scheduler follows, because
fp16 overflow and drift show over steps, not in one. ToMA's own cost (the same loop without merging) is
reported beside it, not judged.

The reference is a record per size (inputs, outputs, selection features, loop latents and destinations)
that can be saved on one machine and loaded on another, where only the candidates run. The models take
turns in memory, since a full-size fp32 reference and an fp16 candidate need not fit together: the
reference makes every record and is released, then each candidate is created, compared at every size and
released before the next.
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import models, quantize
from ..artifacts import DTYPES, Artifact, config_from_section, toma_section
from ..errors import ArtifactError, UsageError
from ..onnx import ExportOptions, ToMAGraph, export_in_child
from ..resources import default_output
from ..toma import ToMAConfig, apply_toma
from .compare import bisect_step, compare_loop, compare_step, fidelity, quantization_cost, selection_step
from .record import RECORD_FORMAT, load_records, make_record, save_records
from .runners import EngineRunnerAdapter, TorchRunner, onnxruntime_provider, onnxruntime_runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ValidateOptions:
    backends: tuple = ("torch", "onnxruntime")
    dtype: str | None = None      # None: the --onnx file's dtype, else the weights' (fp32 where a backend lacks it)
    sizes: tuple | None = None    # ((height, width), ...) pixels; None = the model's default size
    steps: int = 0                # > 0: also a whole loop of that many steps
    batch: int | None = None      # None: a static export's batch, else 2 (CFG)
    atol: float | None = None
    rtol: float | None = None
    onnx: str | None = None       # an exported file (its toma.json gives the ToMA settings); None = export
    engine: str | None = None     # a built engine's engine.json; None = build one when tensorrt is asked for
    output_dir: str | None = None
    save_reference: str | None = None  # write the reference records (.npz) for another machine
    load_reference: str | None = None  # take the reference from such a file instead of running PyTorch
    bisect: bool = False               # on a failing ONNX Runtime step, name the first block out of tolerance
    loras: tuple = ()                  # ((path, scale), ...): the reference loads them with diffusers itself
    quant: quantize.Quantization | None = None   # 8-bit: the reference is the fake-quantized network (same scales)
    controlnets: tuple = ()            # ((name or folder, scale), ...): the chain ControlNets -> network (controlnet.py)
    controlnet_toma: bool = True       # ToMA in the ControlNets' own blocks too


def validate(model: str, config: ToMAConfig | None, options: ValidateOptions = ValidateOptions(),
             progress=None) -> dict:
    progress = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = set(options.backends) - set(BACKENDS)
    if unknown or not options.backends:      # the fp32 reference runs whatever is asked (--load-reference: none)
        raise UsageError(f"backends name the candidates, from {', '.join(BACKENDS)} (torch: PyTorch in --dtype); got "
                         f"{','.join(options.backends) or 'none'}")
    if options.dtype not in (None, *DTYPES):
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.steps < 0:
        raise UsageError(f"--steps must be >= 0 (0: one step, N: also an N-step loop), got {options.steps}")
    spec = models.get(model)
    if options.controlnets:
        return _validate_controlled(model, spec, config, options, progress)
    stored = load_records(options.load_reference) if options.load_reference else None
    if stored and stored["meta"]["model"] != spec.name:
        raise ArtifactError(f"{options.load_reference} holds a reference for {stored['meta']['model']}, not "
                            f"{spec.name}")
    if stored:
        config, options = _from_stored(stored["meta"], options)
    elif options.onnx:
        config, options, spec = _from_export(options.onnx, spec, options)
    if options.quant and (options.loras or stored):
        raise UsageError(f"validate --quantize takes {'no --lora' if options.loras else 'no --load-reference'}: the "
                         "fake-quantized reference is made here from the calibrated scales")
    if options.loras and not stored:        # refused here (family, keys, shapes), before any model is loaded
        from ..lora import terms

        terms(options.loras, spec.family, {k: v.shape for k, v in spec.skeleton().state_dict().items()}, spec.name)
    dtype_note = None
    if options.dtype is None:
        dtype_note = _default_dtype(spec, options)
        options = replace(options, dtype=dtype_note[0])
        progress(f"[validate] dtype {dtype_note[0]}: {dtype_note[1]}")
    options = replace(options, batch=options.batch or 2)
    sizes = list(options.sizes or [spec.size(None, None)])
    report = dict(model=spec.name, dtype=options.dtype, providers={}, skipped={}, comparisons=[], selection=[],
                  fidelity=[], toma=toma_section(config), loras=[dict(file=p, scale=s) for p, s in options.loras],
                  reference="loaded from " + options.load_reference if stored else
                  f"torch fp32, {options.quant.mode} fake-quantized" if options.quant else "torch fp32",
                  quantize=dict(mode=options.quant.mode, level=options.quant.level, scales=options.quant.scales)
                  if options.quant else None, quantization=[])
    if dtype_note:
        report["dtype_reason"] = dtype_note[1]

    plans = _plan_candidates(model, spec, config, options, report, progress)     # refusals before the long runs
    if stored:
        records = stored["records"]
    else:
        records = _reference_phase(spec, config, options, sizes, report, progress)
        if options.save_reference:
            save_records(options.save_reference, records, dict(
                format=RECORD_FORMAT, model=spec.name, sizes=sizes, steps=options.steps, batch=options.batch,
                toma=report["toma"]))
    steps, loops, selection = {}, {}, {}       # per size, in candidate order
    for name, create in plans.items():
        progress(f"[validate] {name}: {len(sizes)} size(s), one step" +
                 (f" and a {options.steps}-step loop each" if options.steps else " each"))
        runner = create()
        with runner:
            for i, size in enumerate(sizes):
                steps.setdefault(i, []).extend(compare_step(records[i], {name: runner}, options, size))
                selection.setdefault(i, []).extend(selection_step(records[i], {name: runner}, options, size))
                if options.steps:
                    loops.setdefault(i, []).extend(compare_loop(spec, records[i], {name: runner}, options, size,
                                                                config))
        del runner, create                      # released before the next candidate is created
        gc.collect()
    for i in range(len(sizes)):                 # the report's order: by size, then steps before loops
        report["comparisons"] += steps.get(i, []) + loops.get(i, [])
        report["selection"] += selection.get(i, [])
    if options.bisect and not stored:
        report["bisect"] = _bisect(spec, config, options, sizes, records, steps, report.get("onnx"), progress)
    if options.save_reference and not stored:
        report["saved_reference"] = options.save_reference
    if not report["comparisons"]:           # nothing compared is not a pass (e.g. --backends torch in fp32)
        report["nothing_compared"] = ("no candidate ran: add onnxruntime or tensorrt to --backends, or validate "
                                      "torch in --dtype fp16/bf16")
    report["passed"] = (bool(report["comparisons"]) and all(c["passed"] for c in report["comparisons"]) and
                        all(s["passed"] for s in report["selection"]))
    return report


def _validate_controlled(model, spec, config, options: ValidateOptions, progress) -> dict:
    from .controlnet import validate_controlled

    given = [flag for flag, value in (("--onnx", options.onnx), ("--engine", options.engine),
                                      ("--save-reference", options.save_reference),
                                      ("--load-reference", options.load_reference), ("--lora", options.loras),
                                      ("--quantize", options.quant)) if value]
    if given:
        raise UsageError(f"validate --controlnet exports and checks the ControlNet graphs and the network itself; drop "
                         f"{', '.join(given)}")
    if options.dtype is None:
        dtype, why = _default_dtype(spec, options)
        options = replace(options, dtype=dtype)
        progress(f"[validate] dtype {dtype}: {why}")
    _refuse_bf16_on_cpu(options)
    return validate_controlled(model, config, replace(options, batch=options.batch or 2), progress)


def _from_stored(meta: dict, options: ValidateOptions):
    config = config_from_section(meta["toma"], options.load_reference)
    sizes = tuple(tuple(s) for s in meta["sizes"])
    return config, replace(options, sizes=sizes, steps=meta["steps"], batch=meta["batch"])


def _default_dtype(spec, options: ValidateOptions) -> tuple[str, str]:
    """(dtype, why): the one the weights are stored in, unless a requested backend cannot run it here."""
    dtype = spec.default_dtype
    if dtype == "bf16" and "onnxruntime" in options.backends and onnxruntime_provider() == "CPUExecutionProvider":
        return "fp32", ("the weights are bf16, which ONNX Runtime's CPU provider cannot run; pass --dtype fp16 for a "
                        "half-precision check, or validate bf16 with --backends torch,tensorrt on a GPU")
    return dtype, "the dtype the weights are stored in" if spec.weights_dtype else "the default for random models"


def _from_export(onnx_path: str, spec, options: ValidateOptions):
    """The file's ToMA settings, every field, and for a static export its own size, batch and text length."""
    artifact = Artifact.load(onnx_path, "onnx")
    artifact.check_model(spec.name)
    size = artifact.static_size
    if size is not None:
        if options.sizes and any(tuple(s) != size for s in options.sizes):
            raise UsageError(f"{onnx_path} is a static {size[0]}x{size[1]} export; validate it at that size (drop "
                             "--sizes) or export with --dynamic")
        if options.batch not in (None, artifact.meta["batch"]):
            raise UsageError(f"{onnx_path} is a static export at batch {artifact.meta['batch']}; drop --batch or "
                             "export with --dynamic")
        options = replace(options, sizes=(size,), batch=artifact.meta["batch"])
        spec = spec.with_text_len(artifact.meta.get("text_len"))
    if options.dtype not in (None, artifact.meta["dtype"]):
        raise UsageError(f"{onnx_path} is a {artifact.meta['dtype']} export; drop --dtype {options.dtype} or pass an "
                         f"export in {options.dtype}")
    made = artifact.meta.get("quantize")
    quant = made and quantize.Quantization(made["mode"], made["level"], made["scales"], made["digest"])
    if options.quant not in (None, quant):
        raise UsageError(f"{onnx_path} is {quant.label() if quant else 'not quantized'}; validate it with its own "
                         "(no --quantize)")
    return artifact.config, replace(options, onnx=str(artifact.path), dtype=artifact.meta["dtype"],
                                    loras=_loras_of(artifact, options.loras), quant=quant), spec


def _loras_of(artifact: Artifact, given: tuple) -> tuple:
    """The LoRAs the reference loads for an export: those it was made with (the same --lora options, or none
    to take the file's own)."""
    from ..lora import LoRA

    recorded = (artifact.meta.get("weights") or {}).get("loras") or []
    if given:
        if [(LoRA(p).digest(), s) for p, s in given] != [(x["sha256"], x["scale"]) for x in recorded]:
            made = ", ".join(f"{Path(x['file']).name}:{x['scale']:g}" for x in recorded) or "no LoRA"
            raise UsageError(f"{artifact.path} was exported with {made}; pass the same --lora options, or none to "
                             "validate it against its own")
        return given
    gone = [x["file"] for x in recorded if not Path(x["file"]).is_file()]
    if gone:
        raise ArtifactError(f"{artifact.path} was exported with the LoRA {gone[0]}, which is gone, and the reference "
                            "loads it; put it back or pass --lora with a copy of it")
    return tuple((x["file"], x["scale"]) for x in recorded)


def _reference_phase(spec, config, options, sizes, report, progress) -> list:
    """Every size's record, and the ToMA fidelity under --steps, from the fp32 reference, which is then
    released: a full-size reference and a candidate need not fit in memory together."""
    reference = TorchRunner(_graph(spec, config, torch.float32, options.loras, options.quant), name="torch-fp32")
    records = []
    with reference:
        for size in sizes:
            progress(f"[validate] reference (torch fp32) {size[0]}x{size[1]} px: one step" +
                     (f", then a {options.steps}-step loop" if options.steps else ""))
            records.append(make_record(spec, reference, config, options, size))
            if options.steps and config:
                report["fidelity"].append(fidelity(spec, reference, records[-1], options, size, config))
            if options.quant:
                report["quantization"].append(quantization_cost(spec, reference, records[-1], options, size, config))
    del reference
    gc.collect()
    return records


def _bisect(spec, config, options, sizes, records, steps, onnx_path, progress) -> list:
    """--bisect on the sizes where ONNX Runtime failed a step. The reference was released before the
    candidates ran, so it is loaded again here, only when some step failed: a second load's time and memory."""
    failing = [i for i in range(len(sizes))
               if any(not e["passed"] and e["backends"][1] == "onnxruntime" for e in steps.get(i, []))]
    if not failing or onnx_path is None:
        return []
    progress("[validate] bisect: loading the reference again")
    reference = _graph(spec, config, torch.float32, options.loras)
    try:
        return [entry for i in failing
                for entry in bisect_step(reference, onnx_path, records[i], options, sizes[i], steps[i])]
    finally:
        del reference
        gc.collect()


def _plan_candidates(model, spec, config, options, report, progress) -> dict:
    """{candidate name: a function that creates its runner}. Everything that can refuse the request, or skip a
    backend, is decided here, before any model is loaded; the exports, builds and loads happen in the
    functions, one candidate at a time."""
    plans = {}
    if "torch" in options.backends and options.dtype != "fp32":
        name = f"torch-{options.dtype}"
        plans[name] = lambda: TorchRunner(_graph(spec, config, DTYPES[options.dtype], options.loras, options.quant),
                                          name=name)
    if "onnxruntime" in options.backends:
        _refuse_bf16_on_cpu(options)                # before exporting

        def onnxruntime():
            path = options.onnx or export_in_child(
                model, config, Path(options.output_dir or default_output()) / "onnx",
                ExportOptions(dynamic=True, dtype=options.dtype, loras=options.loras, quant=options.quant),
                progress=progress)["onnx"]
            runner, provider = onnxruntime_runner(path)
            report["providers"]["onnxruntime"] = provider
            report["onnx"] = path
            return runner
        plans["onnxruntime"] = onnxruntime
    if "tensorrt" in options.backends:
        reason = _tensorrt_unavailable()
        if reason:
            report["skipped"]["tensorrt"] = reason
            progress(f"[validate] tensorrt skipped: {reason}")
        else:
            if options.engine:
                Artifact.load(options.engine, "engine").check_model(spec.name)
            plans["tensorrt"] = lambda: EngineRunnerAdapter(options.engine or _build_engine(model, config, options,
                                                                                            progress))
    return plans


def _refuse_bf16_on_cpu(options: ValidateOptions) -> None:
    if options.dtype == "bf16" and "onnxruntime" in options.backends and \
            onnxruntime_provider() == "CPUExecutionProvider":
        raise UsageError("ONNX Runtime's CPU provider has no bf16 kernels; validate bf16 with "
                         "--backends torch,tensorrt on a GPU, or export fp16/fp32 for ONNX Runtime")


def _graph(spec, config, dtype, loras=(), quant=None):
    """The PyTorch graph, on the GPU when there is one (an fp32 FLUX.1-dev needs about 48 GB), with the LoRAs
    loaded and fused by diffusers itself, so that the reference is not the export's own fusion code, and with
    `quant` the calibrated layers fake-quantized."""
    model = quantize.apply(spec.load(dtype), quant)
    if loras:
        from ..lora import load_with_diffusers

        load_with_diffusers(model, spec.family, loras)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    report = apply_toma(model, config) if config else None
    return ToMAGraph(model, spec, report).eval()


def _tensorrt_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (TensorRT engines run only on one)"
    try:
        from ..trt.backend import load
        load(None)
    except Exception as err:           # noqa: BLE001 - any reason becomes the skip message
        return str(err)
    return None


def _build_engine(model, config, options, progress) -> str:
    from ..trt import BuildOptions, build

    meta = build(model, config, options.output_dir, BuildOptions(dtype=options.dtype, loras=options.loras),
                 progress=progress)
    return str(Path(meta["engine"]).with_name("engine.json"))
