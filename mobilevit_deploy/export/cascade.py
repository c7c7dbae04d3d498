"""Coarse-to-fine cascade artifacts (CF-ViT as static graphs, issue 14): one artifact, one graph per stage.

    python -m mobilevit_deploy.export --target executorch --cascade 32,64 [--exit-data DIR] [--max-drop PTS]

`CascadeSpec` is the `cascade` field of `ExportConfig` (sizes, exit data, allowed top-1 drop); the
export pipeline (`stages.py`) calls into this module at three points and is otherwise unchanged:

- Capture (`capture_stages`): one `torch.export` per stage size of the same module, keyed by the stage
  (method / function) name `forward_<size>`; the pipeline's DeployCfg becomes the last stage's (the
  manifest's `input.shape` is the last stage's).
- Lower (`CASCADE_LOWERERS[target]`): ExecuTorch lowers every program together,
  `to_edge_transform_and_lower({name: ep, ...}, partitioner=[XnnpackPartitioner()])` -> one `.pte` with
  one method per stage; Core ML converts each program (minimum deployment target iOS 18) and merges
  them with `ct.utils.MultiFunctionDescriptor` + `ct.utils.save_multifunction` into one multi-function
  `.mlpackage` (weights shared between functions are de-duplicated by coremltools; the manifest records
  the size against the separate packages).
- Verify (`verify_cascade`, `select_threshold`): every stage of the staged artifact against eager at its
  size on the shipped samples, then the exit threshold: every stage is run once over the exit images
  (through the `.pte` itself; torch-side for Core ML, which has no runtime on Linux, and the manifest
  says which), and `mobilevit_deploy.cascade.choose_threshold` picks the lowest threshold whose cascade
  top-1 is within `max_drop` points of the last stage alone. The result is the manifest's `cascade`
  section (docs/contracts.md).

Importing this module is light (no torch).
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..cascade import EXIT_RULE, check_sizes
from ..errors import DataError, UserError

__all__ = ["CascadeSpec", "stage_name", "CASCADE_LOWERERS", "capture_stages", "verify_cascade",
           "select_threshold", "COREML_CASCADE_DEPLOYMENT_TARGET", "MIN_SIZE", "MAX_SIZE", "NO_CASCADE_TARGETS"]

COREML_CASCADE_DEPLOYMENT_TARGET = "iOS18"  # multi-function ML programs need iOS 18 / macOS 15
MIN_SIZE, MAX_SIZE = 32, 4096  # 32: the models' output stride (a smaller input leaves the last stage < 1 px)
NO_CASCADE_TARGETS = {"onnx": "an ONNX file holds one graph (no multi-method / multi-function form)"}
SAMPLES_NAME = "shipped samples (mobilevit_deploy/assets/samples: 40 CIFAR-10 training images, 4 per class)"


def stage_name(size: int) -> str:
    """The ExecuTorch method / Core ML function name of the stage at `size` px."""
    return f"forward_{int(size)}"


def _parse_sizes(value) -> list[int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        raise UserError(f"--cascade takes input sizes in pixels, smallest first, comma-separated (e.g. 32,64), "
                        f"or exitK for an exit head after stage K (e.g. exit3), got {value!r}") from None


DEPTH_FORM = re.compile(r"^exit(\d+)$")
WHOLE_MODEL = "forward"  # a depth cascade's method / function of the whole model (its "last stage alone")


def _parse_depth(value) -> int | None:
    """K of a depth-cascade value `"exitK"` (exit head after stage K), else None."""
    m = DEPTH_FORM.match(value.strip().lower()) if isinstance(value, str) else None
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CascadeSpec:
    """A cascade export, in one of two forms, validated at construction (no model needed):

    - sizes: stage input `sizes` (px, square, strictly increasing), one graph of the model per size;
    - depth (`exit_after` = K, `--cascade exitK`): the exit branch (stem, stages 1..K, an exit head) and the
      rest of the same network from its stage-K features, at the model's input size; `exit_head` is the
      head's .safetensors (None: the one shipped for the model, models/exit_head.py).

    `exit_data` is the ImageFolder the threshold is chosen on (None: the shipped samples), `max_drop`
    the top-1 points the cascade may lose against the whole model / last stage alone, `exit_limit` the
    number of exit images used, evenly spread (None: all)."""

    sizes: tuple = ()
    exit_data: str | None = None
    max_drop: float = 0.5
    exit_limit: int | None = None
    exit_after: int | None = None
    exit_head: str | None = None

    def __post_init__(self):
        if self.exit_after is not None:
            if self.sizes:
                raise UserError(f"a depth cascade (--cascade exit{self.exit_after}) runs at the model's input size; "
                                f"it takes no stage sizes, got {self.sizes}")
            try:
                k = int(self.exit_after)
            except (TypeError, ValueError):
                raise UserError(f"exit_after must be a stage number >= 1, got {self.exit_after!r}") from None
            if k < 1:
                raise UserError(f"--cascade exit{k}: the exit must follow a stage >= 1 (e.g. exit3)")
            object.__setattr__(self, "exit_after", k)
            if self.exit_head is not None:
                from ..models.exit_head import read_exit_head

                read_exit_head(self.exit_head)  # CheckpointError: missing file / its JSON
                object.__setattr__(self, "exit_head", str(self.exit_head))
        else:
            if self.exit_head is not None:
                raise UserError("--exit-head is the exit head of a depth cascade: it needs --cascade exitK "
                                "(e.g. --cascade exit3)")
            sizes = check_sizes(_parse_sizes(self.sizes))
            bad = [s for s in sizes if not MIN_SIZE <= s <= MAX_SIZE]
            if bad:
                raise UserError(f"--cascade size(s) {', '.join(map(str, bad))} px cannot be taken by the model: "
                                f"each size must be between {MIN_SIZE} (the models' output stride) and {MAX_SIZE} "
                                f"px, got {sizes}")
            object.__setattr__(self, "sizes", tuple(sizes))
        try:
            drop = float(self.max_drop)
        except (TypeError, ValueError):
            raise UserError(f"--max-drop must be a number of top-1 points in [0, 100], got {self.max_drop!r}") from None
        if not 0 <= drop <= 100:
            raise UserError(f"--max-drop must be a number of top-1 points in [0, 100], got {self.max_drop!r}")
        object.__setattr__(self, "max_drop", drop)
        if self.exit_limit is not None and int(self.exit_limit) < 1:
            raise UserError(f"exit_limit must be >= 1 images, got {self.exit_limit}")
        if self.exit_data is not None:
            from ..data import list_image_folder

            root = Path(self.exit_data)
            if not root.is_dir():
                raise DataError(f"--exit-data {root}: directory not found (expected an ImageFolder: "
                                f"{root}/<class>/<image>.jpg)")
            list_image_folder(root)  # DataError: no class folders / no images
            object.__setattr__(self, "exit_data", str(self.exit_data))

    @property
    def depth(self) -> bool:
        """True for the depth form (exit head after stage `exit_after`, then the rest of the network)."""
        return self.exit_after is not None

    @property
    def names(self) -> list[str]:
        """The cascade stages' method / function names (a depth cascade's artifact also has WHOLE_MODEL)."""
        if self.depth:
            return [f"exit_{self.exit_after}", f"rest_{self.exit_after}"]
        return [stage_name(s) for s in self.sizes]

    @property
    def suffix(self) -> str:
        """Artifact file-name part: `_cascade_32_64`, `_cascade_exit3`."""
        if self.depth:
            return f"_cascade_exit{self.exit_after}"
        return "_cascade_" + "_".join(map(str, self.sizes))

    def to_dict(self) -> dict:
        d = {"sizes": list(self.sizes), "exit_data": self.exit_data, "max_drop": self.max_drop,
             "exit_limit": self.exit_limit}
        if self.depth:
            d.update(exit_after=self.exit_after, exit_head=self.exit_head)
        return d

    @classmethod
    def from_value(cls, value, exit_data=None, max_drop=None, exit_head=None) -> CascadeSpec | None:
        """From a CascadeSpec, a `"32,64"` string / list of sizes or `"exit3"` (with `exit_data`, `max_drop`,
        `exit_head` beside it, the CLI's flat form), or `to_dict()`'s mapping. None stays None (then the
        others must be None)."""
        if value is None:
            if exit_head is not None:
                raise UserError("--exit-head is the exit head of a depth cascade: it needs --cascade exitK "
                                "(e.g. --cascade exit3)")
            if exit_data is not None or max_drop is not None:
                raise UserError("--exit-data and --max-drop choose the threshold of a cascade: they need --cascade "
                                "SIZES or exitK (e.g. --cascade 32,64 or --cascade exit3)")
            return None
        if isinstance(value, CascadeSpec):
            return value
        if isinstance(value, dict):
            keys = {"sizes", "exit_data", "max_drop", "exit_limit", "exit_after", "exit_head"}
            unknown = set(value) - keys
            if unknown:
                raise UserError(f"unknown cascade key(s) {', '.join(sorted(unknown))} "
                                f"(valid: {', '.join(sorted(keys))})")
            d = dict(value)
            for k, v in (("exit_data", exit_data), ("max_drop", max_drop), ("exit_head", exit_head)):
                if v is not None:
                    d[k] = v
            d = {k: v for k, v in d.items() if v is not None}
            if "sizes" in d and d.get("exit_after") is not None and not d["sizes"]:
                del d["sizes"]
            return cls(**d)
        kw = {"exit_data": exit_data, "exit_head": exit_head}
        if max_drop is not None:
            kw["max_drop"] = max_drop
        k = _parse_depth(value)
        if k is not None:
            return cls(exit_after=k, **kw)
        return cls(tuple(_parse_sizes(value)), **kw)


def check_target(target: str, backend: str, quant) -> None:
    """UserError for a target / backend / scheme that has no cascade form (one line, the allowed values)."""
    if target in NO_CASCADE_TARGETS:
        raise UserError(f"--cascade is not available for --target {target}: {NO_CASCADE_TARGETS[target]} "
                        f"(choose from: coreml, executorch)")
    if target == "executorch" and backend != "xnnpack":
        raise UserError(f"--cascade with --target executorch is lowered to XNNPACK; --backend {backend} is not "
                        "offered with --cascade (choose from: xnnpack; for iOS use --target coreml --cascade ...)")
    if quant is not None:
        raise UserError("--cascade exports float stages; --quant is not offered with --cascade yet")


# ----------------------------------------------------------------------------------------- capture


def stage_cfgs(deploy_cfg, sizes) -> list:
    """The DeployCfg of every stage: the model's, at the stage's square input size (same crop and
    normalisation: the one preprocessing rule, data.eval_transform)."""
    from dataclasses import replace

    return [replace(deploy_cfg, input_size=(3, int(s), int(s))) for s in sizes]


def _exit_classes_match(spec: CascadeSpec, deploy_cfg) -> None:
    from ..data import find_classes, sample_images

    labels = deploy_cfg.class_labels
    if spec.exit_data is not None:
        classes = find_classes(spec.exit_data)
        if sorted(classes) != sorted(labels):
            raise DataError(f"--exit-data {spec.exit_data}: class folders {_short(classes)} are not the model's "
                            f"labels {_short(labels)}")
    else:
        classes = sorted({c for _, c in sample_images()})
        if not set(classes) <= set(labels):
            raise UserError(f"without --exit-data the threshold is chosen on the shipped CIFAR-10 samples, whose "
                            f"classes {_short(classes)} are not this model's labels {_short(labels)}: "
                            "pass --exit-data DIR "
                            "(an ImageFolder of the model's classes)")


def _short(names, n: int = 10) -> str:
    """A label list for a one-line error: the first n names and how many there are."""
    names = list(names)
    return str(names) if len(names) <= n else f"[{', '.join(map(repr, names[:n]))}, ... ({len(names)} in all)]"


def capture_stages(source, ctx):
    """Capture stage of a cascade: {stage name: ExportedProgram} of the model at every stage size."""
    from dataclasses import replace

    import torch

    from . import capture as cap
    from .stages import Captured

    spec = ctx.config.cascade
    if spec.depth:
        return capture_depth(source, ctx)
    _exit_classes_match(spec, source.deploy_cfg)
    t = time.perf_counter()
    module = source.module
    if hasattr(module, "fold_for_export"):
        import copy

        module = copy.deepcopy(module).fold_for_export()
    wrapped = cap.module_for_target(module, source.deploy_cfg, ctx.config.target)
    programs = {}
    for name, cfg in zip(spec.names, stage_cfgs(source.deploy_cfg, spec.sizes)):
        h, w = cfg.image_size
        try:
            with torch.no_grad():  # a size the model cannot take fails here, in one clear line
                wrapped.eval()(cfg.example_input(1))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"--cascade size {h}: {source.name} cannot take a {h}x{w} input ({first}); "
                            f"sizes must be {MIN_SIZE}..{MAX_SIZE} px that the model accepts") from None
        programs[name] = cap.capture(wrapped, cfg)
    last = replace(source, deploy_cfg=stage_cfgs(source.deploy_cfg, spec.sizes[-1:])[0])
    ctx.timings["capture"] = time.perf_counter() - t
    sizes = ", ".join(f"{s}x{s}" for s in spec.sizes)
    ctx.log(f"capture: torch.export of {source.name} at 1x3x{{{sizes}}}, one program per cascade stage"
            f"{cap.describe_wrapper(source.deploy_cfg, ctx.config.target)} ({ctx.timings['capture']:.1f} s)")
    return Captured(last, programs)


def capture_depth(source, ctx):
    """Capture stage of a depth cascade: the model split after stage K with its exit head
    (models/exit_head.py), {exit_K: image -> (exit logits, features), rest_K: features -> logits,
    forward: image -> logits} -- Core ML: probabilities instead of logits. The Captured source's module
    becomes the `DepthSplit` (what Verify checks every method against)."""
    from dataclasses import replace

    import torch

    from ..models.exit_head import load_depth_split
    from . import capture as cap
    from .stages import Captured

    spec, target = ctx.config.cascade, ctx.config.target
    t = time.perf_counter()
    split = load_depth_split(source.module, source.name, spec.exit_after, spec.exit_head,
                             source.checkpoint.get("sha256"))
    _exit_classes_match(spec, source.deploy_cfg)
    cfg = source.deploy_cfg
    x = cfg.example_input(1)
    with torch.no_grad():
        features = split.exit_branch(x)[1]
    exit_name, rest_name = spec.names
    if target == "coreml":
        modules = {exit_name: cap.CoreMLClassifier(split.exit_branch, cfg), rest_name: cap.Softmax(split.rest_branch),
                   WHOLE_MODEL: cap.CoreMLClassifier(split.model, cfg)}
    else:
        modules = {exit_name: split.exit_branch, rest_name: split.rest_branch, WHOLE_MODEL: split.model}
    programs = {name: torch.export.export(m.eval(), (features if name == rest_name else x,))
                for name, m in modules.items()}
    ctx.timings["capture"] = time.perf_counter() - t
    _, h, w = cfg.input_size
    hw = split.head_weights
    ctx.log(f"capture: torch.export of {source.name} split after stage {spec.exit_after} with exit head "
            f"{hw.head} ({hw.path.name}): {exit_name} (1x3x{h}x{w} -> logits, features "
            f"{'x'.join(map(str, features.shape))}), {rest_name} (features -> logits), {WHOLE_MODEL} (the whole "
            f"model){cap.describe_wrapper(cfg, target)} ({ctx.timings['capture']:.1f} s)")
    return Captured(replace(source, module=split), programs)


# ----------------------------------------------------------------------------------------- lowerers


def lower_executorch(programs: dict, deploy_cfg, config, name: str, scheme: str = "fp32"):
    """All stages lowered together to XNNPACK (`executorch.lower` of {method: program}, with its
    speed-ups): one ExecutorchProgramManager, one method per stage."""
    from . import executorch as et
    from .stages import LoweredProgram

    program, by_method = et.lower(programs, precision=config.precision)
    outside: dict[str, int] = {}
    for ops in by_method.values():
        for op, n in ops.items():
            outside[op] = outside.get(op, 0) + n
    n_out = sum(outside.values())
    what = (f"ExecuTorch, XNNPACK delegate, {scheme}, {len(programs)} methods ({', '.join(programs)}) in one program; "
            + (f"{n_out} ops outside the delegate: " + ", ".join(f"{k} x{v}" for k, v in sorted(outside.items()))
               if outside else "every op of every method delegated"))
    extra = {"ops_not_delegated_counts": dict(sorted(outside.items())), "ops_not_delegated_by_method": by_method}
    return LoweredProgram(program, et.save, what, ops_outside=dict(sorted(outside.items())), extra=extra)


def _dir_size(p: Path) -> int:
    from ..checkpoint import artifact_size

    return artifact_size(p)


def lower_coreml(programs: dict, deploy_cfg, config, name: str, scheme: str = "fp32"):
    """Every stage converted to an ML program (iOS 18); `save` merges them into one multi-function package."""
    from . import coreml
    from .stages import LoweredProgram

    dt = config.deployment_target
    spec = config.cascade
    models = {}
    if spec.depth:  # exit: image -> probabilities, features; rest: features -> probabilities; forward: classifier
        exit_name, rest_name = spec.names
        feature_shape = tuple(programs[rest_name].example_inputs[0][0].shape)
        kw = dict(precision=config.precision, minimum_deployment_target=dt)
        models[exit_name] = coreml.convert_arrays(programs[exit_name], deploy_cfg, outputs=[
            coreml.OUTPUT_ARRAY_PROBS, "features"], model_name=f"{name} {exit_name}", **kw)
        models[rest_name] = coreml.convert_arrays(programs[rest_name], deploy_cfg, outputs=[
            coreml.OUTPUT_ARRAY_PROBS], feature_shape=feature_shape, model_name=f"{name} {rest_name}", **kw)
        models[WHOLE_MODEL] = coreml.convert(programs[WHOLE_MODEL], deploy_cfg, model_name=f"{name} {WHOLE_MODEL}",
                                             **kw)
        default = WHOLE_MODEL
        parts = [f"{exit_name} (image -> probabilities, features {'x'.join(map(str, feature_shape))})",
                 f"{rest_name} (features -> probabilities)", f"{WHOLE_MODEL} (the classifier)"]
    else:
        for (fname, ep), cfg in zip(programs.items(), stage_cfgs(deploy_cfg, spec.sizes)):
            models[fname] = coreml.convert(ep, cfg, precision=config.precision, minimum_deployment_target=dt,
                                           model_name=f"{name} {fname}")
        default = spec.names[-1]
        parts = [f"{f} ({s}x{s})" for f, s in zip(models, spec.sizes)]
    extra = {"minimum_deployment_target": dt, "coreml_functions": list(models), "coreml_default_function": default}

    def save(mlmodels: dict, path) -> Path:
        return save_multifunction(mlmodels, path, default=default, record=extra)

    what = (f"Core ML multi-function ML program, {config.precision}, functions " + ", ".join(parts)
            + f", {deploy_cfg.num_classes} labels, minimum deployment target {dt}")
    return LoweredProgram(models, save, what, extra=extra)


def save_multifunction(mlmodels: dict, path, *, default: str, record: dict | None = None) -> Path:
    """Save each MLModel as its own package in a temporary directory, merge them with
    `ct.utils.MultiFunctionDescriptor` + `ct.utils.save_multifunction` (function i = model i's "main"),
    and move the result to `path`. `record` (the manifest's extra keys) receives the sizes of the merged
    package and of the separate packages."""
    import coremltools as ct

    from .coreml import replace_dir

    if not hasattr(ct.utils, "MultiFunctionDescriptor") or not hasattr(ct.utils, "save_multifunction"):
        raise UserError(f"coremltools {ct.__version__} has no multi-function support (needs coremltools >= 8): "
                        "upgrade coremltools for --target coreml --cascade")
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        separate = {}
        desc = ct.utils.MultiFunctionDescriptor()
        for fname, m in mlmodels.items():
            p = tmp / f"{fname}.mlpackage"
            m.save(str(p))
            separate[fname] = _dir_size(p)
            desc.add_function(str(p), "main", fname)  # (model path, source function, target function)
        desc.default_function_name = default
        merged = tmp / path.name
        ct.utils.save_multifunction(desc, str(merged))
        size = _dir_size(merged)
        replace_dir(merged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if record is not None:
        total = sum(separate.values())
        record["coreml_multifunction"] = {
            "size_bytes": size, "separate_packages_bytes": separate, "separate_packages_total_bytes": total,
            "size_ratio_vs_separate": size / total if total else None,
            "note": "weights shared by the functions are stored once (coremltools const de-duplication)"}
    return path


# target -> lowerer(programs {stage name: ExportedProgram}, deploy_cfg (last stage), config, model name, scheme)
CASCADE_LOWERERS = {"executorch": lower_executorch, "coreml": lower_coreml}


# ----------------------------------------------------------------------------------------- verify


def _verify_depth_pte(staged, split, deploy_cfg, config) -> dict:
    """Every method of a depth-cascade `.pte` on the shipped samples against the `DepthSplit`'s modules:
    exit (logits and features), rest (fed the eager features) and the whole model."""
    import torch

    from .. import verify as vf
    from ..runtime import ExecuTorchRunner

    exit_name, rest_name = config.cascade.names
    x, names = vf.sample_batch(deploy_cfg)
    runners = {n: ExecuTorchRunner(staged, method=n) for n in (exit_name, rest_name, WHOLE_MODEL)}
    with torch.no_grad():
        ref_logits, ref_feats = split.exit_branch(x)
        refs = {exit_name: ref_logits, rest_name: split.rest_branch(ref_feats), WHOLE_MODEL: split.model(x)}
    outs = [runners[exit_name].run_outputs(x[i:i + 1]) for i in range(len(x))]
    tests = {exit_name: torch.cat([o[0] for o in outs]),
             rest_name: torch.cat([runners[rest_name].run_one(ref_feats[i:i + 1].contiguous())
                                   for i in range(len(x))]),
             WHOLE_MODEL: runners[WHOLE_MODEL](x)}
    feats_diff = float((torch.cat([o[1] for o in outs]) - ref_feats).abs().max())
    min_sqnr = vf.MIN_SQNR_DB.get(config.precision, 20.0)
    stages = []
    for n in (exit_name, rest_name, WHOLE_MODEL):
        c = vf.compare(refs[n], tests[n])
        stages.append({"name": n, "input": "features" if n == rest_name else "image", "images": len(names), **c,
                       "passed": bool(c["sqnr_db"] >= min_sqnr)})
    worst = min(stages, key=lambda st: st["sqnr_db"])
    return {"images": len(names), "method": "executorch runtime, every method (rest fed the eager exit features)",
            "sqnr_db": worst["sqnr_db"], "max_abs_diff": max(st["max_abs_diff"] for st in stages),
            "top1_agreement": min(st["top1_agreement"] for st in stages), "min_sqnr_db": min_sqnr,
            "features_max_abs_diff": feats_diff, "stages": stages, "passed": all(st["passed"] for st in stages)}


def _coreml_depth_checks(s, spec, deploy_cfg) -> dict:
    """Structural checks of a depth cascade's multi-function spec (exit, rest, the whole-model classifier)."""
    from .coreml import OUTPUT_ARRAY_PROBS, OUTPUT_LABEL, OUTPUT_PROBS

    funcs = {f.name: f for f in s.description.functions}
    exit_name, rest_name = spec.names
    _, h, w = deploy_cfg.input_size

    def io(f, which):
        return [] if f is None else [(v.name, v.type.WhichOneof("Type")) for v in getattr(f, which)]

    img = funcs[exit_name].input[0].type.imageType if exit_name in funcs and funcs[exit_name].input else None
    return {
        "functions": sorted(funcs) == sorted([exit_name, rest_name, WHOLE_MODEL])
        and set(s.mlProgram.functions) == set(funcs),
        "default_function": s.description.defaultFunctionName == WHOLE_MODEL,
        "exit_io": io(funcs.get(exit_name), "input") == [("image", "imageType")]
        and io(funcs.get(exit_name), "output") == [(OUTPUT_ARRAY_PROBS, "multiArrayType"),
                                                   ("features", "multiArrayType")]
        and img is not None and (img.height, img.width) == (h, w),
        "rest_io": io(funcs.get(rest_name), "input") == [("features", "multiArrayType")]
        and io(funcs.get(rest_name), "output") == [(OUTPUT_ARRAY_PROBS, "multiArrayType")],
        "whole_model_classifier": sorted(n for n, _ in io(funcs.get(WHOLE_MODEL), "output"))
        == sorted([OUTPUT_LABEL, OUTPUT_PROBS]),
    }


def _coreml_function_checks(path, spec, deploy_cfg, config) -> dict:
    import coremltools as ct

    from .coreml import OUTPUT_LABEL, OUTPUT_PROBS, deployment_target

    m = ct.models.MLModel(str(path), skip_model_load=True)
    s = m.get_spec()
    funcs = {f.name: f for f in s.description.functions}
    if spec.depth:
        checks = {"ml_program": s.WhichOneof("Type") == "mlProgram", **_coreml_depth_checks(s, spec, deploy_cfg),
                  "deployment_target": s.specificationVersion == deployment_target(config.deployment_target).value}
        return {"checks": checks, "spec_version": s.specificationVersion, "functions": list(funcs)}
    checks = {
        "ml_program": s.WhichOneof("Type") == "mlProgram",
        "functions": list(funcs) == spec.names and set(s.mlProgram.functions) == set(spec.names),
        "default_function": s.description.defaultFunctionName == spec.names[-1],
        "deployment_target": s.specificationVersion == deployment_target(config.deployment_target).value,
    }
    sizes_ok = outputs_ok = True
    for fname, size in zip(spec.names, spec.sizes):
        f = funcs.get(fname)
        if f is None or len(f.input) != 1 or f.input[0].type.WhichOneof("Type") != "imageType":
            sizes_ok = False
            continue
        img = f.input[0].type.imageType
        sizes_ok &= (img.height, img.width) == (size, size) and img.colorSpace == img.RGB
        outputs_ok &= sorted(o.name for o in f.output) == sorted([OUTPUT_LABEL, OUTPUT_PROBS])
    checks["function_input_sizes"] = sizes_ok
    checks["function_outputs"] = outputs_ok
    return {"checks": checks, "spec_version": s.specificationVersion, "functions": list(funcs)}


def verify_cascade(staged, module, deploy_cfg, config) -> dict:
    """The manifest's `verification` of a cascade artifact: for `.pte`, every method run by the ExecuTorch
    runtime on the shipped samples at its size against eager (per stage: SQNR, max |diff|, top-1
    agreement); for `.mlpackage`, the multi-function spec (function names, input sizes, outputs, iOS 18)."""
    import sys

    from .. import verify as vf
    from ..runtime import ExecuTorchRunner

    spec = config.cascade
    if spec.depth and Path(staged).suffix == ".pte":
        return _verify_depth_pte(staged, module, deploy_cfg, config)
    if Path(staged).suffix == ".mlpackage":
        res = _coreml_function_checks(staged, spec, deploy_cfg, config)
        return {"images": 0, "method": f"coreml multi-function spec check ({sys.platform}: no Core ML runtime)",
                "sqnr_db": None, "max_abs_diff": None, "top1_agreement": None, **res,
                "passed": all(res["checks"].values())}
    min_sqnr = vf.MIN_SQNR_DB.get(config.precision, 20.0)
    stages, worst = [], None
    for fname, cfg in zip(spec.names, stage_cfgs(deploy_cfg, spec.sizes)):
        x, names = vf.sample_batch(cfg)
        ref = vf.eager_logits(module, x)
        test = ExecuTorchRunner(staged, method=fname)(x)
        c = vf.compare(ref, test)
        stages.append({"name": fname, "input_size": list(cfg.image_size), "images": len(names), **c,
                       "passed": bool(c["sqnr_db"] >= min_sqnr)})
        worst = c if worst is None or c["sqnr_db"] < worst["sqnr_db"] else worst
    return {"images": stages[0]["images"], "method": "executorch runtime, every method at its own size",
            "sqnr_db": worst["sqnr_db"], "max_abs_diff": max(s["max_abs_diff"] for s in stages),
            "top1_agreement": min(s["top1_agreement"] for s in stages), "min_sqnr_db": min_sqnr,
            "stages": stages, "passed": all(s["passed"] for s in stages)}


def describe_verification(v: dict) -> str:
    if v.get("stages"):
        return "; ".join(f"{s['name']}: SQNR {s['sqnr_db']:.1f} dB, top-1 agreement "
                         f"{round(s['top1_agreement'] * s['images'])}/{s['images']}" for s in v["stages"]) + \
            f" ({v['method']})"
    checks = v.get("checks") or {}
    return f"{v['method']}; {sum(checks.values())}/{len(checks)} checks passed"


# ----------------------------------------------------------------------------------------- threshold


def exit_images(spec: CascadeSpec, deploy_cfg):
    """(paths, labels (model label indices), data description) of the images the threshold is chosen on."""
    from ..data import list_image_folder, sample_images

    labels = deploy_cfg.class_labels
    if spec.exit_data is None:
        samples = sample_images()
        paths, ys = [p for p, _ in samples], [labels.index(c) for _, c in samples]
        data = SAMPLES_NAME
    else:
        samples, classes = list_image_folder(spec.exit_data)
        paths, ys = [p for p, _ in samples], [labels.index(classes[c]) for _, c in samples]
        data = str(spec.exit_data)
    if spec.exit_limit:  # the same pick as `evaluate --limit` (evenly spread over the sorted list)
        step = max(1, len(paths) // spec.exit_limit)
        paths, ys = paths[::step][:spec.exit_limit], ys[::step][:spec.exit_limit]
    return paths, ys, data


def stage_probabilities(run_stage, paths, cfgs, chunk: int = 200) -> list:
    """Softmax probabilities [N, C] (float64 numpy) of every stage over `paths`, each stage fed the images
    prepared at its own size. `run_stage(i, x)` -> logits of stage i for a batch x."""
    import numpy as np
    import torch

    from ..cascade import softmax
    from ..data import load_batch

    out = []
    for i, cfg in enumerate(cfgs):
        logits = []
        for k in range(0, len(paths), chunk):
            with torch.no_grad():
                logits.append(run_stage(i, load_batch(paths[k:k + chunk], cfg)).float().numpy())
        out.append(softmax(np.concatenate(logits)))
    return out


def cascade_section(spec: CascadeSpec, choice, stage_probs, labels, data: str, measured_with: str) -> dict:
    """The manifest `cascade` section from a ThresholdChoice; a threshold above 1 (no image may exit) is
    capped at 1.0 and the outcome re-measured there."""
    import numpy as np

    from ..cascade import simulate

    threshold, outcome, capped = float(choice.threshold), choice.outcome, False
    if threshold > 1.0:
        threshold, capped = 1.0, True
        outcome = simulate(stage_probs, labels, threshold)
    sel = choice.to_manifest(data, len(labels))
    sel.update(cascade_top1=round(outcome.top1, 2), exit_rates=[round(r, 4) for r in outcome.exit_rates])
    y = np.asarray(labels)
    sel["stage_top1"] = [round(100.0 * float((p.argmax(1) == y).mean()), 2) for p in stage_probs]
    sel["measured_with"] = measured_with
    if capped:
        sel["no_exit"] = True
        sel["note"] = ("no threshold below 1 keeps the cascade within max_drop_points of the last stage alone: "
                       "the threshold is capped at 1.0, so an image exits early only when its stage-1 max "
                       f"probability is exactly 1.0 ({outcome.exit_rates[0] * 100:.1f} % here)")
    return {"stages": [{"name": n, "input_size": [s, s]} for n, s in zip(spec.names, spec.sizes)],
            "exit_rule": {"kind": EXIT_RULE, "threshold": threshold},  # unrounded: an image at it exits
            "threshold_selection": sel}


def select_threshold(staged, source, config, log=print) -> dict:
    """Run every stage over the exit images and choose the threshold: the manifest `cascade` section."""
    from ..cascade import choose_threshold

    spec = config.cascade
    t = time.perf_counter()
    paths, ys, data = exit_images(spec, source.deploy_cfg)
    if spec.depth:
        probs, measured_with, feature_shape = _depth_probabilities(staged, source, config, paths)
    else:
        probs, measured_with = _size_probabilities(staged, source, config, paths)
    choice = choose_threshold(probs, ys, spec.max_drop)
    section = cascade_section(spec, choice, probs, ys, data, measured_with)
    if spec.depth:
        _, h, w = source.deploy_cfg.input_size
        exit_name, rest_name = spec.names
        section = {"kind": "depth",
                   "stages": [{"name": exit_name, "input": "image", "input_size": [h, w],
                               "outputs": ["logits", "features"]},
                              {"name": rest_name, "input": "features", "features_from": exit_name,
                               "features_shape": list(feature_shape), "outputs": ["logits"]}],
                   "whole_model": {"name": WHOLE_MODEL, "input_size": [h, w]},
                   "exit_head": source.module.head_weights.to_manifest(),
                   **{k: v for k, v in section.items() if k != "stages"}}
    sel, thr = section["threshold_selection"], section["exit_rule"]["threshold"]
    log(f"cascade: threshold {thr:.4f} on {len(ys)} images of {data if spec.exit_data else 'the shipped samples'}: "
        f"top-1 {sel['cascade_top1']:.2f} % ({'whole model' if spec.depth else 'last stage'} alone "
        f"{sel['last_stage_top1']:.2f} %, max drop "
        f"{spec.max_drop:g}), exit rates "
        + ", ".join(f"{n} {r * 100:.1f} %" for n, r in zip(spec.names, sel["exit_rates"]))
        + (" [no threshold below 1 qualifies: capped at 1.0]" if sel.get("no_exit") else "")
        + f" ({time.perf_counter() - t:.1f} s)")
    return section


def _depth_probabilities(staged, source, config, paths, chunk: int = 200):
    """([exit probabilities, rest-on-exit-features probabilities] over `paths`, how, features shape): through
    the `.pte`'s exit and rest methods, or torch-side with the `DepthSplit` for Core ML."""
    import numpy as np
    import torch

    from ..cascade import softmax
    from ..data import load_batch

    exit_name, rest_name = config.cascade.names
    split = source.module
    if Path(staged).suffix == ".pte":
        from ..runtime import ExecuTorchRunner

        ex = ExecuTorchRunner(staged, method=exit_name)
        rest = ExecuTorchRunner(staged, method=rest_name, program=ex._program)

        def run(x):
            outs = [ex.run_outputs(x[i:i + 1]) for i in range(len(x))]
            feats = [o[1] for o in outs]
            return torch.cat([o[0] for o in outs]), torch.cat([rest.run_one(f) for f in feats]), feats[0].shape
        how = "the artifact (ExecuTorch runtime: exit, then rest on the exit method's own features)"
    else:
        import sys

        def run(x):
            with torch.no_grad():
                logits, feats = split.exit_branch(x)
                return logits, split.rest_branch(feats), (1, *feats.shape[1:])
        how = (f"torch-side: the fp32 PyTorch exit and rest branches (Core ML cannot run on {sys.platform})"
               + ("; the artifact is fp16" if config.precision == "fp16" else ""))
    le, lr, shape = [], [], None
    for k in range(0, len(paths), chunk):
        a, b, shape = run(load_batch(paths[k:k + chunk], source.deploy_cfg))
        le.append(a.float().numpy())
        lr.append(b.float().numpy())
    return [softmax(np.concatenate(le)), softmax(np.concatenate(lr))], how, tuple(int(d) for d in shape)


def _size_probabilities(staged, source, config, paths):
    """Every stage's probabilities over `paths` at its own size, and how they were measured."""
    spec = config.cascade
    cfgs = stage_cfgs(source.deploy_cfg, spec.sizes)
    if Path(staged).suffix == ".pte":
        from ..runtime import ExecuTorchRunner

        runners = [ExecuTorchRunner(staged, method=n) for n in spec.names]
        measured_with = "the artifact (ExecuTorch runtime, every method)"

        def run_stage(i, x):
            return runners[i](x)
    else:  # Core ML: no runtime on Linux; the fp32 PyTorch model at each stage size
        import sys

        module = source.module.eval()
        measured_with = (f"torch-side: the fp32 PyTorch model at each stage size (Core ML cannot run on "
                         f"{sys.platform}); the artifact is fp16" if config.precision == "fp16" else
                         "torch-side: the fp32 PyTorch model at each stage size")

        def run_stage(i, x):
            return module(x)
    return stage_probabilities(run_stage, paths, cfgs), measured_with

