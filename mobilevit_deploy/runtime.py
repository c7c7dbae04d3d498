"""Run an exported artifact from Python: `load_artifact(path, num_threads=None) -> Runner`.

A Runner is callable on a normalised float32 tensor [N, 3, H, W] (the DeployCfg's preprocessing,
`mobilevit_deploy.data.load_batch`) and returns logits [N, C]. Artifacts are exported with batch 1,
so a batch is run one image at a time.

- `.pte`: ExecuTorch runtime (`executorch.runtime`). XNNPACK runs on ExecuTorch's process-wide
  threadpool; `num_threads` resets that pool (`_unsafe_reset_threadpool`, which affects every
  ExecuTorch program in the process). Left at None, the pool keeps whatever size ExecuTorch chose —
  on this 2-core machine that was 1 thread, so pass `num_threads` when comparing runtimes. The
  actual size is in `runner.num_threads`.
- `.onnx`: ONNX Runtime, CPUExecutionProvider, `intra_op_num_threads=num_threads` (None: ORT's
  default, one thread per core).
- `.mlpackage`: Core ML, macOS only (raises UserError elsewhere). The model ends in a softmax, so the
  runner returns log-probabilities (`output_kind == "log_probabilities"`: logits up to a per-row
  constant, same argmax).

`runner.bind(x)` binds one input [1, 3, H, W] for timing: `call()` is the runtime's own inference
call and nothing else (`Method.execute`, `InferenceSession.run`, `MLModel.predict`), `output()` one
inference returning the artifact's output as a float32 tensor [1, C] (the benchmark uses both).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

SUFFIXES = (".pte", ".onnx", ".mlpackage")


@dataclass(frozen=True)
class Bound:
    """An artifact's inference bound to one input (see the module docstring)."""

    call: Callable[[], object]
    output: Callable[[], object]
    runner: object = None  # keeps the loaded program alive while the calls are in use


class Runner:
    """Base class: `runner(x) -> logits`. Subclasses set `kind`, `input_shape`, `num_threads`."""

    kind = "?"
    output_kind = "logits"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.input_shape: tuple[int, ...] = ()
        self.num_threads: int | None = None

    @property
    def manifest(self) -> dict | None:
        """The manifest beside the artifact, or None."""
        from .export.manifest import manifest_path_for, read_manifest

        p = manifest_path_for(self.path)
        return read_manifest(p) if p.is_file() else None

    def _check(self, x):
        import torch

        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise UserError(f"{self.path.name}: expected a float32 tensor [N, 3, H, W], got "
                            f"{type(x).__name__}{list(x.shape) if hasattr(x, 'shape') else ''}")
        want = tuple(self.input_shape[1:])
        if want and tuple(x.shape[1:]) != want:
            raise UserError(f"{self.path.name} takes [N, {', '.join(map(str, want))}] inputs, got {list(x.shape)}")
        return x.detach().to(torch.float32).contiguous()

    def run_one(self, x):  # x: [1, 3, H, W]
        raise NotImplementedError

    def bind(self, x) -> Bound:  # x: [1, 3, H, W]
        raise NotImplementedError

    def __call__(self, x):
        import torch

        x = self._check(x)
        return torch.cat([self.run_one(x[i:i + 1]) for i in range(x.shape[0])], dim=0)

    def __repr__(self):
        return (f"{type(self).__name__}({str(self.path)!r}, input_shape={self.input_shape}, "
                f"num_threads={self.num_threads})")


class ExecuTorchRunner(Runner):
    kind = "executorch"

    def __init__(self, path: Path, num_threads: int | None = None, method: str = "forward", program=None):
        """`method`: the program's method to run (a cascade `.pte` has one per stage, e.g. "forward_32");
        `program`: an already loaded `executorch.runtime.Program` of `path` to take it from (loaded once)."""
        super().__init__(path)
        self.method_name = method
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if num_threads is not None:
            portable_lib._unsafe_reset_threadpool(int(num_threads))
        self.num_threads = int(portable_lib._threadpool_get_thread_count())
        runtime = Runtime.get()
        try:
            self._program = program if program is not None else runtime.load_program(str(self.path))
            self._method = self._program.load_method(method)
        except Exception as e:
            raise UserError(_explain_pte_failure(self.path, runtime, e)) from e
        meta = self._method.metadata
        self.input_shape = tuple(meta.input_tensor_meta(0).sizes())
        self.output_shape = tuple(meta.output_tensor_meta(0).sizes())

    def run_one(self, x):
        out = self._method.execute([x])
        return out[0].clone()  # the output may live in the method's planned memory, reused next call

    def run_outputs(self, x) -> list:
        """Every output of the method on x (a depth cascade's exit: logits, features), cloned."""
        return [o.clone() for o in self._method.execute([x])]

    def bind(self, x) -> Bound:
        args, method = [x.contiguous()], self._method
        return Bound(lambda: method.execute(args), lambda: method.execute(args)[0].clone(), self)


def _explain_pte_failure(path, runtime, err) -> str:
    try:
        from .export.executorch import inspect_pte

        delegates = set(inspect_pte(path)["delegates"])
    except Exception:
        delegates = set()
    have = set(runtime.backend_registry.registered_backend_names)
    missing = sorted(delegates - have)
    if missing:
        return (f"cannot run {path.name} here: it is delegated to {', '.join(missing)}, which the ExecuTorch "
                f"runtime on {sys.platform} does not provide (available: {', '.join(sorted(have))})")
    return f"cannot load {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class OnnxRuntimeRunner(Runner):
    kind = "onnxruntime"

    def __init__(self, path: Path, num_threads: int | None = None):
        super().__init__(path)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if num_threads is not None:
            so.intra_op_num_threads = int(num_threads)
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._sess = ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"cannot load {self.path}: {type(e).__name__}: {first}") from e
        self.num_threads = int(num_threads) if num_threads is not None else None
        inp = self._sess.get_inputs()[0]
        self._input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        self._dynamic_batch = self.input_shape[0] == -1

    def run_one(self, x):
        import torch

        return torch.from_numpy(self._sess.run(None, {self._input_name: x.numpy()})[0])

    def bind(self, x) -> Bound:
        import torch

        sess, feed = self._sess, {self._input_name: x.contiguous().numpy()}
        return Bound(lambda: sess.run(None, feed), lambda: torch.from_numpy(sess.run(None, feed)[0].copy()), self)

    def __call__(self, x):
        import torch

        if self._dynamic_batch:
            x = self._check(x)
            return torch.from_numpy(self._sess.run(None, {self._input_name: x.numpy()})[0])
        return super().__call__(x)


class CoreMLRunner(Runner):
    kind = "coreml"
    output_kind = "log_probabilities"

    def __init__(self, path: Path, num_threads: int | None = None, compute_units: str = "CPU_ONLY"):
        super().__init__(path)
        from .export.coreml import load_for_predict

        self._model = load_for_predict(path, compute_units)  # raises UserError off macOS
        from .models import DeployCfg

        m = self.manifest
        if m is None or "deploy_cfg" not in m:
            raise UserError(f"{path.name}: the Core ML runner needs the manifest beside it "
                            "(for the input normalisation)")
        self.deploy_cfg = DeployCfg.from_dict(m["deploy_cfg"])
        self.input_shape = (1, *self.deploy_cfg.input_size)

    def run_one(self, x):
        from .export.coreml import predict_probs

        return predict_probs(self._model, x, self.deploy_cfg).clamp_min(1e-30).log()

    def bind(self, x) -> Bound:
        """`output()` is the classifier's probabilities (in label order), as the artifact returns them."""
        import torch

        from .export.coreml import OUTPUT_PROBS, tensor_to_pil

        model, labels = self._model, self.deploy_cfg.class_labels
        feed = {"image": tensor_to_pil(x[0], self.deploy_cfg)}

        def output():
            probs = model.predict(feed)[OUTPUT_PROBS]
            return torch.tensor([[float(probs[k]) for k in labels]], dtype=torch.float32)

        return Bound(lambda: model.predict(feed), output, self)


def load_artifact(path: str | os.PathLike, num_threads: int | None = None, *,
                  compute_units: str = "CPU_ONLY") -> Runner:
    """A Runner for a `.pte`, `.onnx` or (macOS only) `.mlpackage` artifact (`compute_units`: Core ML's
    `coremltools.ComputeUnit` name)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"artifact not found: {p}")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"unknown artifact type {p.name!r} (choose from: {', '.join(SUFFIXES)})")
    if num_threads is not None and int(num_threads) < 1:
        raise UserError(f"num_threads must be >= 1, got {num_threads}")
    from .export.manifest import manifest_path_for

    mpath = manifest_path_for(p)
    if mpath.is_file() and '"cascade"' in mpath.read_text(encoding="utf-8"):
        from .export.manifest import read_manifest

        if read_manifest(mpath).get("cascade"):
            raise UserError(f"{p.name} is a cascade artifact (one graph per stage, see its manifest): run it with "
                            "mobilevit_deploy.runtime.load_cascade(path)")
    if suffix == ".pte":
        return ExecuTorchRunner(p, num_threads)
    if suffix == ".onnx":
        return OnnxRuntimeRunner(p, num_threads)
    return CoreMLRunner(p, num_threads, compute_units)


# ----------------------------------------------------------------------------------------- cascades


@dataclass(frozen=True)
class CascadeAnswer:
    """What one cascade call returns: the answering stage's logits [1, C] and which stage answered."""

    logits: object  # torch.Tensor [1, C] of the answering stage
    stage: int  # index of the answering stage (0 = the smallest input)
    name: str  # its method / function name (manifest cascade.stages[i].name)
    max_probabilities: tuple  # the max softmax probability of every stage that ran, in order

    @property
    def label_index(self) -> int:
        return int(self.logits.argmax(-1)[0])


class CascadeRunner:
    """A coarse-to-fine cascade artifact (manifest `cascade` section, docs/contracts.md): one call per image.

    Size cascade: `runner(image)` (a PIL image or an image path) runs stage 1 on the image prepared at
    stage 1's size; when the largest softmax probability of its logits is >= `threshold` that answer is
    final, otherwise the next stage runs on the same image prepared at its own size (`data.eval_transform`
    of the manifest's DeployCfg at that size: the one preprocessing rule); the last stage always answers.
    Depth cascade (`kind: depth`): stage 1 (`exit_K`) returns logits and stage-K features; stage 2
    (`rest_K`, input `features`) runs on those features, not on the image.
    Returns a `CascadeAnswer` (logits, answering stage). `run_prepared(inputs)` is the same decision on
    inputs already prepared for every image stage (`prepare_all`; None for a feature stage: what the
    benchmarks time, model time only); `run_stage(i, x)` runs one stage alone. `alone` runs the whole
    model / last stage alone on `inputs[alone_input]` (the cascade's reference). `threshold` overrides
    the manifest's (threshold sweeps).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None, *, threshold: float | None = None,
                 compute_units: str = "CPU_ONLY"):
        from dataclasses import replace

        from .export.manifest import manifest_path_for, read_manifest
        from .models import DeployCfg

        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"artifact not found: {self.path}")
        if not manifest_path_for(self.path).is_file():
            raise UserError(f"{self.path.name} has no manifest beside it: a cascade's stages and exit rule are in it")
        self.manifest = read_manifest(self.path)
        c = self.manifest.get("cascade")
        if not c:
            raise UserError(f"{self.path.name} is not a cascade artifact (its manifest has no 'cascade' section); "
                            "use load_artifact")
        self.stage_names, self.stage_sizes, self.stage_inputs, alone_name = _check_cascade_section(c, self.path.name)
        self.kind = c.get("kind", "sizes")
        rule = c["exit_rule"]
        self.threshold = float(rule["threshold"] if threshold is None else threshold)
        base = DeployCfg.from_dict(self.manifest["deploy_cfg"])
        self.stage_cfgs = [replace(base, input_size=(3, h, w)) for h, w in self.stage_sizes]
        self.deploy_cfg = self.stage_cfgs[-1]
        self.alone_input = len(self.stage_names) - 1 if self.kind == "sizes" else 0
        self.alone_what = "last stage" if self.kind == "sizes" else f"whole model ({alone_name})"
        suffix = self.path.suffix.lower()
        if suffix == ".pte":
            first = ExecuTorchRunner(self.path, num_threads, method=self.stage_names[0])
            self.stages = [first] + [ExecuTorchRunner(self.path, None, method=name, program=first._program)
                                     for name in self.stage_names[1:]]  # one program, one method per stage
            self.alone = (self.stages[-1] if alone_name == self.stage_names[-1] else
                          ExecuTorchRunner(self.path, None, method=alone_name, program=first._program))
            self.num_threads = self.stages[0].num_threads
        elif suffix == ".mlpackage":
            if self.kind != "sizes":
                raise UserError(f"{self.path.name} is a depth cascade: its functions pass feature arrays, which "
                                "the Python Core ML runner does not feed (run it in the app through MobileViTKit, or "
                                "export --target executorch --cascade exitK to run it here)")
            self.stages = [_coreml_function_runner(self.path, name, cfg, compute_units)
                           for name, cfg in zip(self.stage_names, self.stage_cfgs)]
            self.alone = self.stages[-1]
            self.num_threads = None
        else:
            raise UserError(f"{self.path.name}: cascades are .pte or .mlpackage artifacts")
        self._transforms = None

    def prepare(self, image, stage: int):
        """The image (PIL or path) as stage `stage`'s input [1, 3, H, W] (None for a feature stage)."""
        from .data import eval_transform, load_rgb

        if self.stage_inputs[stage] != "image":
            return None
        if self._transforms is None:
            self._transforms = [eval_transform(cfg) for cfg in self.stage_cfgs]
        if not hasattr(image, "size"):
            image = load_rgb(image)
        return self._transforms[stage](image).unsqueeze(0).contiguous()  # the runtimes read NCHW memory

    def prepare_all(self, image) -> list:
        if not hasattr(image, "size"):
            from .data import load_rgb

            image = load_rgb(image)
        return [self.prepare(image, i) for i in range(len(self.stages))]

    def run_stage(self, i: int, x):
        return self.stages[i](x)

    def _decide(self, get_input) -> CascadeAnswer:
        from .cascade import softmax

        probs = []
        last = len(self.stages) - 1
        carried = None  # the previous stage's features, for a stage whose input is "features"
        for i in range(last + 1):
            x = carried if self.stage_inputs[i] == "features" else get_input(i)
            if i < last and self.stage_inputs[i + 1] == "features":
                logits, carried = self.stages[i].run_outputs(x)[:2]
            else:
                logits = self.stages[i].run_one(x)
            p = float(softmax(logits.numpy()).max())
            probs.append(p)
            if i == last or p >= self.threshold:
                return CascadeAnswer(logits, i, self.stage_names[i], tuple(probs))
        raise AssertionError("unreachable")

    def run_prepared(self, inputs) -> CascadeAnswer:
        return self._decide(lambda i: inputs[i])

    def __call__(self, image) -> CascadeAnswer:
        if not hasattr(image, "size"):
            from .data import load_rgb

            image = load_rgb(image)
        return self._decide(lambda i: self.prepare(image, i))

    def __repr__(self):
        return (f"CascadeRunner({str(self.path)!r}, kind={self.kind}, stages={self.stage_names}, "
                f"inputs={self.stage_inputs}, threshold={self.threshold})")


def _check_cascade_section(c: dict, what: str):
    """(names, image sizes, stage inputs, name of the whole model / last stage alone) of a manifest cascade
    section; UserError for what docs/contracts.md says readers reject."""
    kind = c.get("kind", "sizes")
    if kind not in ("sizes", "depth"):
        raise UserError(f"{what}: unknown cascade kind {kind!r} (choose from: sizes, depth)")
    try:
        stages = c["stages"]
        names = [str(s["name"]) for s in stages]
        inputs = [str(s.get("input", "image")) for s in stages]
        if kind == "depth":
            h, w = (int(v) for v in stages[0]["input_size"])
            sizes = [(h, w)] * len(stages)
            alone = str(c["whole_model"]["name"])
            from_ = [s.get("features_from") for s in stages[1:]]
        else:
            sizes = [(int(s["input_size"][0]), int(s["input_size"][1])) for s in stages]
            alone, from_ = names[-1], []
        rule_kind, threshold = c["exit_rule"]["kind"], float(c["exit_rule"]["threshold"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{what}: malformed cascade section ({type(e).__name__}: {e})") from None
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise UserError(f"{what}: a cascade needs >= 2 stages with distinct names, got {names}")
    if kind == "sizes":
        if any(i != "image" for i in inputs):
            raise UserError(f"{what}: every stage of a size cascade takes the image, got inputs {inputs}")
        if any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(sizes, sizes[1:])):
            raise UserError(f"{what}: cascade stage sizes must strictly increase, got {sizes}")
    else:
        if inputs[0] != "image" or any(i != "features" for i in inputs[1:]) or from_ != names[:-1]:
            raise UserError(f"{what}: a depth cascade's first stage takes the image and every later stage the "
                            f"features of the stage before it, got inputs {inputs} (features_from {from_})")
    if rule_kind != "max_probability":
        raise UserError(f"{what}: unknown cascade exit rule {rule_kind!r} (choose from: max_probability)")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"{what}: cascade threshold must be in [0, 1], got {threshold}")
    return names, sizes, inputs, alone


def _coreml_function_runner(path: Path, function_name: str, deploy_cfg, compute_units: str):
    """One function of a multi-function `.mlpackage` (macOS only, iOS 18 / macOS 15 Core ML)."""
    from .export.coreml import load_for_predict

    load_for_predict(path, compute_units)  # raises UserError off macOS, with the reason
    import coremltools as ct

    runner = CoreMLRunner.__new__(CoreMLRunner)
    Runner.__init__(runner, path)
    runner._model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units),
                                      function_name=function_name)
    runner.deploy_cfg = deploy_cfg
    runner.input_shape = (1, *deploy_cfg.input_size)
    return runner


def load_cascade(path: str | os.PathLike, num_threads: int | None = None, *, threshold: float | None = None,
                 compute_units: str = "CPU_ONLY") -> CascadeRunner:
    """A CascadeRunner for a cascade `.pte` (or, on macOS, multi-function `.mlpackage`) and its manifest."""
    if num_threads is not None and int(num_threads) < 1:
        raise UserError(f"num_threads must be >= 1, got {num_threads}")
    return CascadeRunner(path, num_threads, threshold=threshold, compute_units=compute_units)
