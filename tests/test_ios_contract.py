"""The iOS demo (ios_demo/) against the rest of the project.

Contracts across the two languages (docs/contracts.md):
- a manifest written by the Python exporter decodes in Swift (`mvkit-manifest`, the app's own decoder);
- a device report written by the Swift code (`mvkit-report`, the app's own encoder and ModelBench
  statistics) is accepted by the Python harness (`mobilevit_deploy.bench.device_report`).
These need a Swift toolchain (on PATH or /opt/swift/usr/bin/swift) and skip, saying so, without one.

Without Swift: the Xcode project is parsed and cross-checked (every object it references exists,
the scheme points at the app target, the synced folder and local package exist), the app's sources
are checked for model facts they must not hard-code, and the model install script is exercised.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IOS = ROOT / "ios_demo"
PKG = IOS / "MobileViTKit"
APP = IOS / "MobileViTDemo"
PBXPROJ = IOS / "MobileViTDemo.xcodeproj" / "project.pbxproj"
SCHEME = IOS / "MobileViTDemo.xcodeproj" / "xcshareddata" / "xcschemes" / "MobileViTDemo.xcscheme"
FIXTURES = PKG / "Tests" / "MobileViTKitTests" / "Fixtures"
INSTALL = IOS / "scripts" / "install_model.sh"
CONTRACTS = ROOT / "docs" / "contracts.md"


# --------------------------------------------------------------------------------------------------
# helpers


def find_swift() -> str | None:
    found = shutil.which("swift")
    if found:
        return found
    opt = Path("/opt/swift/usr/bin/swift")
    return str(opt) if opt.is_file() and os.access(opt, os.X_OK) else None


def parse_pbxproj(text: str):
    """Parse an old-style (NeXTSTEP) plist as Xcode writes project.pbxproj: dicts `{k = v;}`, arrays
    `(a, b,)`, quoted and bare strings, `/* */` and `//` comments. Raises ValueError on bad syntax."""
    tokens = re.compile(
        r'\s+|/\*.*?\*/|//[^\n]*|(?P<q>"(?:[^"\\]|\\.)*")|(?P<p>[{}()=;,])|(?P<w>[A-Za-z0-9_$./:<>+\-]+)', re.S)
    toks, pos = [], 0
    while pos < len(text):
        m = tokens.match(text, pos)
        if not m:
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
        pos = m.end()
        if m.group("q") is not None:
            toks.append(("s", bytes(m.group("q")[1:-1], "utf-8").decode("unicode_escape")))
        elif m.group("p") is not None:
            toks.append(("p", m.group("p")))
        elif m.group("w") is not None:
            toks.append(("s", m.group("w")))
    i = 0

    def expect(p):
        nonlocal i
        if i >= len(toks) or toks[i] != ("p", p):
            raise ValueError(f"expected {p!r} at token {i}, got {toks[i] if i < len(toks) else 'end'}")
        i += 1

    def value():
        nonlocal i
        if i >= len(toks):
            raise ValueError("unexpected end")
        kind, v = toks[i]
        if (kind, v) == ("p", "{"):
            i += 1
            d = {}
            while toks[i] != ("p", "}"):
                k = value()
                if not isinstance(k, str):
                    raise ValueError(f"dictionary key must be a string at token {i}")
                expect("=")
                if k in d:
                    raise ValueError(f"duplicate key {k!r}")
                d[k] = value()
                expect(";")
            i += 1
            return d
        if (kind, v) == ("p", "("):
            i += 1
            a = []
            while toks[i] != ("p", ")"):
                a.append(value())
                if toks[i] == ("p", ","):
                    i += 1
                elif toks[i] != ("p", ")"):
                    raise ValueError(f"expected ',' or ')' at token {i}")
            i += 1
            return a
        if kind == "s":
            i += 1
            return v
        raise ValueError(f"unexpected {v!r} at token {i}")

    root = value()
    if i != len(toks):
        raise ValueError(f"trailing tokens after the root object (token {i})")
    return root


OBJECT_ID = re.compile(r"^[0-9A-F]{24}$")


def referenced_ids(node):
    """Every 24-hex-digit object id used as a value anywhere below `node`."""
    if isinstance(node, dict):
        for v in node.values():
            yield from referenced_ids(v)
    elif isinstance(node, list):
        for v in node:
            yield from referenced_ids(v)
    elif isinstance(node, str) and OBJECT_ID.match(node):
        yield node


def contract_example(section: int) -> dict:
    """The JSON example of docs/contracts.md section 1 (manifest) or 2 (device report), comments stripped."""
    text = CONTRACTS.read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    raw = blocks[section - 1]
    raw = "\n".join(re.sub(r"\s//.*$", "", line) for line in raw.splitlines())
    return json.loads(raw)


def modelbench_reference(rounds, trim_low, trim_high):
    """An independent Python ModelBench: per round, mean after dropping the extremes."""
    out = []
    for r in rounds:
        kept = sorted(r)[trim_low:len(r) - trim_high]
        out.append(sum(kept) / len(kept))
    return out


def check_report_schema(d: dict):
    """docs/contracts.md section 2, checked here independently of the Python reader."""
    assert set(d) == set(contract_example(2)), "top-level keys differ from the contract"
    assert d["schema_version"] == 1
    assert set(d["device"]) == {"name", "identifier", "os"}
    assert all(isinstance(v, str) and v for v in d["device"].values())
    assert d["compute_units"] in ("all", "cpuAndNeuralEngine", "cpuAndGPU", "cpuOnly")
    assert isinstance(d["model"], str) and isinstance(d["precision"], str) and isinstance(d["artifact_sha256"], str)
    assert isinstance(d["input_size"], list) and len(d["input_size"]) == 2
    assert all(type(x) is int and x > 0 for x in d["input_size"])
    m = d["method"]
    assert set(m) == set(contract_example(2)["method"])
    assert m["name"] == "modelbench" and all(type(m[k]) is int for k in m if k != "name")
    assert len(d["rounds_ms"]) == m["rounds"] and all(isinstance(x, float | int) and x > 0 for x in d["rounds_ms"])
    s = d["stats_ms"]
    assert set(s) == {"median", "mean", "p90", "min", "max", "std"}
    r = sorted(d["rounds_ms"])
    n = len(r)

    def pct(q):
        pos = (n - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return r[lo] + (r[hi] - r[lo]) * (pos - lo)

    mean = sum(r) / n
    expect = {"median": pct(50), "mean": mean, "p90": pct(90), "min": r[0], "max": r[-1],
              "std": math.sqrt(sum((x - mean) ** 2 for x in r) / n)}
    for k, v in expect.items():
        assert math.isclose(s[k], v, rel_tol=1e-9, abs_tol=1e-9), (k, s[k], v)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", d["created"]), d["created"]


def field(report, name):
    """A field of whatever `load_device_report` returns (dataclass or dict)."""
    return report[name] if isinstance(report, dict) else getattr(report, name)


# --------------------------------------------------------------------------------------------------
# Swift toolchain: one build per session


@pytest.fixture(scope="session")
def swift_bins():
    swift = find_swift()
    if swift is None:
        pytest.skip("no Swift toolchain (swift not on PATH, no /opt/swift/usr/bin/swift): "
                    "the Swift side of the iOS contract is not checked here")
    build = subprocess.run([swift, "build", "--package-path", str(PKG)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"swift build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    binpath = subprocess.run([swift, "build", "--package-path", str(PKG), "--show-bin-path"],
                             capture_output=True, text=True, check=True).stdout.strip()
    bins = {name: Path(binpath) / name for name in ("mvkit-report", "mvkit-manifest")}
    for p in bins.values():
        assert p.is_file(), f"{p} was not built"
    return bins


def run(cmd, ok=True):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def mvkit_manifest_json(swift_bins, path, *extra) -> dict:
    return json.loads(run([swift_bins["mvkit-manifest"], "--json", *extra, path]).stdout)


# --------------------------------------------------------------------------------------------------
# Swift -> Python: device reports


def test_swift_synthetic_report_is_accepted_by_python(swift_bins, tmp_path):
    out = tmp_path / "report.json"
    r = run([swift_bins["mvkit-report"], "--manifest", FIXTURES / "manifest.json", "--synthetic", "--seed", "3",
             "--compute-units", "cpuAndNeuralEngine", "--out", out])
    assert "SYNTHETIC" in r.stderr
    d = json.loads(out.read_text())
    check_report_schema(d)
    fixture = json.loads((FIXTURES / "manifest.json").read_text())
    assert d["device"]["name"] == "synthetic (mvkit-report --synthetic)", "synthetic output must say so"
    assert d["device"]["identifier"] == "synthetic"
    assert d["model"] == fixture["model"] and d["precision"] == fixture["precision"]
    assert d["artifact_sha256"] == fixture["artifact"]["sha256"]
    assert d["input_size"] == fixture["input"]["shape"][2:]
    assert d["compute_units"] == "cpuAndNeuralEngine"
    assert d["method"] == {"name": "modelbench", "warmup": 10, "rounds": 20, "inferences_per_round": 50,
                           "trim_low": 10, "trim_high": 10}
    # same seed, same numbers (the created timestamp aside)
    again = tmp_path / "again.json"
    run([swift_bins["mvkit-report"], "--manifest", FIXTURES / "manifest.json", "--synthetic", "--seed", "3",
         "--compute-units", "cpuAndNeuralEngine", "--out", again])
    assert json.loads(again.read_text())["rounds_ms"] == d["rounds_ms"]

    dr = pytest.importorskip("mobilevit_deploy.bench.device_report")
    rep = dr.load_device_report(out)
    assert field(rep, "model") == fixture["model"]
    assert tuple(field(rep, "input_size")) == tuple(fixture["input"]["shape"][2:])
    assert not rep.is_iphone12, "a synthetic report must never count as an iPhone 12 measurement"


def test_swift_modelbench_matches_python_on_given_timings(swift_bins, tmp_path):
    """Known per-inference timings in; Swift's trimming and statistics must equal two independent
    Python implementations (this test's and the bench harness's)."""
    rounds, per_round, tl, th = 4, 12, 2, 3
    timings = [[round(5 + 0.37 * ((i * 7 + r * 5) % 11) + (40.0 if i == r else 0.0), 6) for i in range(per_round)]
               for r in range(rounds)]
    tfile = tmp_path / "timings.json"
    tfile.write_text(json.dumps(timings))
    out = tmp_path / "r.json"
    run([swift_bins["mvkit-report"], "--manifest", FIXTURES / "manifest.json", "--timings", tfile,
         "--device-name", "iPhone 12", "--device-identifier", "iPhone13,2", "--os", "iOS 18.1",
         "--warmup", "3", "--rounds", rounds, "--inferences", per_round, "--trim-low", tl, "--trim-high", th,
         "--out", out])
    d = json.loads(out.read_text())
    check_report_schema(d)
    expect = modelbench_reference(timings, tl, th)
    assert d["rounds_ms"] == pytest.approx(expect, abs=5e-5)  # reported to 0.1 us
    assert d["method"] == {"name": "modelbench", "warmup": 3, "rounds": rounds, "inferences_per_round": per_round,
                           "trim_low": tl, "trim_high": th}

    dr = pytest.importorskip("mobilevit_deploy.bench.device_report")
    py = dr.modelbench_stats(timings, tl, th)
    assert d["rounds_ms"] == pytest.approx(py["rounds_ms"], abs=5e-5)
    for k, v in py["stats_ms"].items():
        assert d["stats_ms"][k] == pytest.approx(v, abs=1e-4), k
    rep = dr.load_device_report(out)
    assert rep.is_iphone12 and field(rep, "median_ms") == pytest.approx(d["stats_ms"]["median"])

    # the README's step 9, as written there
    import sys

    md = tmp_path / "bench" / "out.md"
    r = subprocess.run([sys.executable, "-m", "mobilevit_deploy.bench", "--device-report", str(out), "--device-only",
                        "--report", str(md)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    text = md.read_text()
    assert "iPhone 12 (iPhone13,2)" in text and f"{d['stats_ms']['median']:.2f}" in text


def test_swift_report_rejects_bad_input(swift_bins, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps([[1.0, 2.0, 3.0]]))  # one round of 3, but the defaults need 20 x 50
    r = run([swift_bins["mvkit-report"], "--manifest", FIXTURES / "manifest.json", "--timings", bad,
             "--device-name", "x", "--device-identifier", "x", "--os", "x", "--out", tmp_path / "o.json"], ok=False)
    assert r.returncode == 1 and "rounds" in r.stderr and not (tmp_path / "o.json").exists()
    r = run([swift_bins["mvkit-report"], "--synthetic"], ok=False)
    assert r.returncode == 2 and "--manifest" in r.stderr


# --------------------------------------------------------------------------------------------------
# Python -> Swift: manifests


def test_fixture_manifest_has_the_contract_keys():
    """The checked-in Swift fixture is in exact schema form (same keys as docs/contracts.md)."""
    fixture = json.loads((FIXTURES / "manifest.json").read_text())
    example = contract_example(1)
    assert set(fixture) == set(example)
    for k in ("input", "output", "artifact", "checkpoint", "verification"):
        assert set(fixture[k]) == set(example[k]), k
    assert len(fixture["labels"]) == fixture["output"]["shape"][-1]


def test_swift_decodes_fixture_and_rejects_broken(swift_bins, tmp_path):
    j = mvkit_manifest_json(swift_bins, FIXTURES / "manifest.json")
    assert j["input_size"] == [256, 256] and j["num_labels"] == 10 and j["first_label"] == "airplane"
    assert j["model"] == "mobilevit_xxs" and j["precision"] == "fp16"
    broken = json.loads((FIXTURES / "manifest.json").read_text())
    broken["labels"] = broken["labels"][:3]
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(broken))
    r = run([swift_bins["mvkit-manifest"], p], ok=False)
    assert r.returncode == 1 and "labels" in r.stderr
    del broken["input"]
    p.write_text(json.dumps(broken))
    r = run([swift_bins["mvkit-manifest"], p], ok=False)
    assert r.returncode == 1 and "input" in r.stderr


def test_python_manifest_writer_decodes_in_swift(swift_bins, tmp_path):
    """A manifest from the exporter's own writer (build_manifest/input_spec/write_manifest), with a
    non-square input, ImageNet normalisation and an infinite SQNR, decodes in Swift to the same facts."""
    mf = pytest.importorskip("mobilevit_deploy.export.manifest")
    from mobilevit_deploy.export import ExportConfig
    from mobilevit_deploy.models import DeployCfg
    from mobilevit_deploy.pretrained import LoadedModel

    labels = tuple(f"label {i}" for i in range(7))
    cfg = DeployCfg(input_size=(3, 96, 160), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    crop_pct=0.875, interpolation="bilinear", num_classes=7, labels=labels)
    source = LoadedModel(None, "mobilevit_test", cfg, {"path": None, "sha256": "untrained"})
    manifest = mf.build_manifest(
        ExportConfig("coreml"), source, {"file": "mobilevit_test.mlpackage", "sha256": "ab" * 32, "size_bytes": 123},
        verification={"images": 8, "method": "coreml spec check (Linux)", "sqnr_db": float("inf"),
                      "max_abs_diff": 0.0, "top1_agreement": 1.0, "checks": {"ml_program": True}},
    )
    assert manifest["output"] == {"name": "classLabel_probs", "shape": [1, 7], "kind": "probabilities",
                                  "label_output": "classLabel"}
    path = tmp_path / "mobilevit_test.mlpackage.json"
    mf.write_manifest(path, manifest)
    j = mvkit_manifest_json(swift_bins, path, "--image-size", "640x480")
    assert j["input_size"] == [96, 160], "H, W in that order"
    assert j["num_labels"] == 7 and j["first_label"] == "label 0"
    assert j["input_kind"] == "image" and j["output_kind"] == "probabilities"
    scale, bias = cfg.scale_bias
    assert j["scale"] == pytest.approx(scale, rel=1e-12)
    assert j["bias"] == pytest.approx(bias, rel=1e-12)
    assert j["crop_pct"] == 0.875 and j["artifact_sha256"] == "ab" * 32

    # a report for that artifact ties back to it and is accepted by the harness
    out = tmp_path / "report.json"
    run([swift_bins["mvkit-report"], "--manifest", path, "--synthetic", "--out", out])
    d = json.loads(out.read_text())
    check_report_schema(d)
    assert (d["model"], d["precision"], d["input_size"], d["artifact_sha256"]) == (
        "mobilevit_test", "fp16", [96, 160], "ab" * 32)
    dr = pytest.importorskip("mobilevit_deploy.bench.device_report")
    dr.load_device_report(out)


def test_swift_crop_matches_python_eval_transform(swift_bins, tmp_path):
    """The app's crop rectangle is the region `mobilevit_deploy.data.eval_transform` keeps.

    A coordinate-coded image (each pixel stores its own x, y) goes through the real eval_transform
    with nearest-neighbour resizing; the source coordinates of the corner pixels it keeps must lie
    in Swift's crop rectangle (within one resampling step)."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    PIL = pytest.importorskip("PIL.Image")
    from mobilevit_deploy.data import eval_transform
    from mobilevit_deploy.models import DeployCfg

    cases = [((3, 96, 160), 0.875, 640, 480), ((3, 256, 256), 0.9, 500, 375), ((3, 64, 64), 1.0, 300, 900)]
    for size, crop_pct, iw, ih in cases:
        cfg = DeployCfg(input_size=size, crop_pct=crop_pct, interpolation="nearest", num_classes=2)
        mf = pytest.importorskip("mobilevit_deploy.export.manifest")
        from mobilevit_deploy.export import ExportConfig
        from mobilevit_deploy.pretrained import LoadedModel

        source = LoadedModel(None, "m", cfg, {"path": None, "sha256": "untrained"})
        m = mf.build_manifest(ExportConfig("coreml"), source, {"file": "m.mlpackage", "sha256": "0", "size_bytes": 1})
        path = tmp_path / "m.mlpackage.json"
        mf.write_manifest(path, m)
        x, y, w, h = mvkit_manifest_json(swift_bins, path, "--image-size", f"{iw}x{ih}")["crop_rect"]

        xs, ys = np.meshgrid(np.arange(iw), np.arange(ih))
        img = np.stack([xs % 256, ys % 256, (xs // 256) + 16 * (ys // 256)], axis=-1).astype(np.uint8)
        t = eval_transform(cfg)(PIL.fromarray(img, "RGB"))  # [3, H, W], mean 0 / std 1 -> pixel / 255
        px = (t.numpy() * 255).round().astype(int)

        def src(r, c, px=px):
            return px[0, r, c] + 256 * (px[2, r, c] % 16), px[1, r, c] + 256 * (px[2, r, c] // 16)

        H, W = size[1], size[2]
        step_x, step_y = w / W, h / H
        (x0, y0), (x1, y1) = src(0, 0), src(H - 1, W - 1)
        assert x - 1 <= x0 <= x + step_x + 1 and y - 1 <= y0 <= y + step_y + 1, (size, iw, ih, (x, y), (x0, y0))
        assert x + w - step_x - 1 <= x1 <= x + w + 1 and y + h - step_y - 1 <= y1 <= y + h + 1, (
            size, iw, ih, (x + w, y + h), (x1, y1))


@pytest.mark.slow
def test_real_coreml_export_to_swift_and_back(swift_bins, tmp_path):
    """The whole path on Linux: export a tiny non-square Core ML model, decode its manifest in Swift,
    install it for the app, write a (synthetic) device report for it and read that with the harness."""
    pytest.importorskip("coremltools")
    export = pytest.importorskip("mobilevit_deploy.export")
    import dataclasses

    from mobilevit_deploy import get_deploy_cfg

    cfg = dataclasses.replace(get_deploy_cfg("mobilevit_xxs", num_classes=10), input_size=(3, 64, 96))
    res = export.export_model(export.ModelSource("mobilevit_xxs", num_classes=10, deploy_cfg=cfg),
                              export.ExportConfig("coreml"), out_dir=tmp_path / "artifacts", log=None)
    manifest = json.loads(Path(res.manifest_path).read_text())
    j = mvkit_manifest_json(swift_bins, res.manifest_path)
    assert j["input_size"] == [64, 96]
    assert j["num_labels"] == len(manifest["labels"]) == 10
    assert j["output_name"] == manifest["output"]["name"]

    dest = tmp_path / "Model"
    r = subprocess.run([str(INSTALL), str(res.artifact)], env={**os.environ, "MVKIT_MODEL_DIR": str(dest)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (dest / Path(res.artifact).name).is_dir() and (dest / (Path(res.artifact).name + ".json")).is_file()

    out = tmp_path / "report.json"
    run([swift_bins["mvkit-report"], "--manifest", res.manifest_path, "--synthetic", "--out", out])
    dr = pytest.importorskip("mobilevit_deploy.bench.device_report")
    rep = dr.load_device_report(out)
    assert field(rep, "artifact_sha256") == manifest["artifact"]["sha256"]
    assert tuple(field(rep, "input_size")) == (64, 96)


# --------------------------------------------------------------------------------------------------
# Xcode project, app sources, scripts (no Swift needed)


@pytest.fixture(scope="module")
def pbx():
    return parse_pbxproj(PBXPROJ.read_text(encoding="utf-8"))


def test_pbxproj_parser_rejects_broken_files():
    good = "// !$*UTF8*$!\n{ a = 1; b = ( x, \"y z\", ); c = { d = e; }; }"
    assert parse_pbxproj(good) == {"a": "1", "b": ["x", "y z"], "c": {"d": "e"}}
    for bad in ("{ a = 1; ", "{ a = 1 }", "{ a = (1, 2; }", "{ a = 1; } }", "{ a = 1; a = 2; }"):
        with pytest.raises((ValueError, IndexError)):
            parse_pbxproj(bad)


def test_pbxproj_is_consistent(pbx):
    objects = pbx["objects"]
    assert pbx["objectVersion"] == "77" and pbx["archiveVersion"] == "1"
    missing = {i for i in referenced_ids(pbx) if i not in objects}
    assert not missing, f"referenced but undefined objects: {sorted(missing)}"
    for oid, obj in objects.items():
        assert OBJECT_ID.match(oid) and "isa" in obj, oid
    # every object is reachable from the root (no dangling leftovers)
    seen, todo = set(), [pbx["rootObject"]]
    while todo:
        oid = todo.pop()
        if oid not in seen:
            seen.add(oid)
            todo.extend(referenced_ids(objects[oid]))
    assert seen == set(objects), f"unreachable objects: {sorted(set(objects) - seen)}"

    project = objects[pbx["rootObject"]]
    assert project["isa"] == "PBXProject"
    (target_id,) = project["targets"]
    target = objects[target_id]
    assert target["isa"] == "PBXNativeTarget" and target["name"] == "MobileViTDemo"
    assert target["productType"] == "com.apple.product-type.application"
    assert [objects[b]["isa"] for b in target["buildPhases"]] == [
        "PBXSourcesBuildPhase", "PBXFrameworksBuildPhase", "PBXResourcesBuildPhase"]

    # the synchronized folder is the app's source folder
    (group_id,) = target["fileSystemSynchronizedGroups"]
    group = objects[group_id]
    assert group["isa"] == "PBXFileSystemSynchronizedRootGroup"
    assert (IOS / group["path"]).resolve() == APP.resolve() and APP.is_dir()
    assert group_id in objects[project["mainGroup"]]["children"]

    # the local package exists and provides the linked product
    (pkg_id,) = project["packageReferences"]
    pkg = objects[pkg_id]
    assert pkg["isa"] == "XCLocalSwiftPackageReference"
    assert (IOS / pkg["relativePath"] / "Package.swift").is_file()
    (dep_id,) = target["packageProductDependencies"]
    dep = objects[dep_id]
    assert dep["isa"] == "XCSwiftPackageProductDependency" and dep["package"] == pkg_id
    assert f'.library(name: "{dep["productName"]}"' in (IOS / pkg["relativePath"] / "Package.swift").read_text()
    frameworks = next(objects[b] for b in target["buildPhases"] if objects[b]["isa"] == "PBXFrameworksBuildPhase")
    assert [objects[f]["productRef"] for f in frameworks["files"]] == [dep_id]

    # build settings the app relies on, in both configurations
    wanted = ((project["buildConfigurationList"], {"IPHONEOS_DEPLOYMENT_TARGET": "17.0", "SDKROOT": "iphoneos"}),
              (target["buildConfigurationList"], {"COREML_CODEGEN_LANGUAGE": "None", "GENERATE_INFOPLIST_FILE": "YES",
                                                  "SWIFT_VERSION": "5.0"}))
    for cfg_list, keys in wanted:
        configs = [objects[c] for c in objects[cfg_list]["buildConfigurations"]]
        assert sorted(c["name"] for c in configs) == ["Debug", "Release"]
        for c in configs:
            for k, v in keys.items():
                assert c["buildSettings"].get(k) == v, (c["name"], k)
    for c in (objects[c] for c in objects[target["buildConfigurationList"]]["buildConfigurations"]):
        assert c["buildSettings"]["INFOPLIST_KEY_NSCameraUsageDescription"].strip()


def test_shared_scheme_builds_the_app_target(pbx):
    import xml.etree.ElementTree as ET

    objects = pbx["objects"]
    target_id = objects[pbx["rootObject"]]["targets"][0]
    refs = ET.parse(SCHEME).getroot().iter("BuildableReference")
    refs = list(refs)
    assert refs, "scheme has no buildable reference"
    for ref in refs:
        assert ref.get("BlueprintIdentifier") == target_id
        assert ref.get("BuildableName") == "MobileViTDemo.app"
        assert ref.get("ReferencedContainer") == "container:MobileViTDemo.xcodeproj"
    assert (IOS / "MobileViTDemo.xcodeproj" / "project.xcworkspace" / "contents.xcworkspacedata").is_file()


def test_app_and_kit_hard_code_no_model_facts():
    """Input size, labels, normalisation and model names come from the model and its manifest."""
    sources = sorted(APP.glob("*.swift")) + sorted((PKG / "Sources").rglob("*.swift"))
    assert len(sources) >= 8
    labels = ("airplane", "automobile", "goldfish", "tench", "class_0")
    forbidden = [
        (re.compile(r"\b(64|96|112|128|160|192|224|256|288|320|384)\s*[,x×)]"), "an input size"),
        (re.compile(r"mobilevit_(?!deploy)|cmt_|\.mlmodelc\"|\.mlpackage\""), "a model or file name"),
        (re.compile(r"0\.485|0\.456|0\.406|0\.229|0\.224|0\.225|0\.00392"), "normalisation constants"),
        (re.compile("|".join(labels)), "a class label"),
    ]
    for path in sources:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("//")[0]
            for pattern, what in forbidden:
                assert not pattern.search(code), f"{path.relative_to(ROOT)}:{n} hard-codes {what}: {line.strip()}"


def test_apple_only_code_is_fenced_in_the_package():
    for path in (PKG / "Sources").rglob("*.swift"):
        text = path.read_text(encoding="utf-8")
        for framework in ("CoreML", "SwiftUI", "UIKit", "Vision", "CoreGraphics", "PhotosUI"):
            if re.search(rf"^import {framework}$", text, re.M):
                assert "#if canImport(CoreML)" in text, f"{path.name} imports {framework} outside #if canImport"


def _fake_export(tmp_path: Path, name="mobilevit_fake", target="coreml") -> Path:
    pkg = tmp_path / "artifacts" / f"{name}.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    manifest["target"] = target
    manifest["artifact"]["file"] = pkg.name
    (tmp_path / "artifacts" / f"{name}.mlpackage.json").write_text(json.dumps(manifest))
    return pkg


def test_install_script_copies_artifact_and_manifest(tmp_path):
    dest = tmp_path / "Model"
    dest.mkdir()
    (dest / ".gitignore").write_text("*\n")
    (dest / "old.mlpackage").mkdir()
    env = {**os.environ, "MVKIT_MODEL_DIR": str(dest)}
    a, b = _fake_export(tmp_path, "model_a"), _fake_export(tmp_path, "model_b")
    r = subprocess.run([str(INSTALL), str(a)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == [".gitignore", "model_a.mlpackage", "model_a.mlpackage.json"]
    assert (dest / "model_a.mlpackage" / "Manifest.json").is_file()
    r = subprocess.run([str(INSTALL), "--keep", str(b) + "/"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {"model_a.mlpackage", "model_b.mlpackage.json"} <= {p.name for p in dest.iterdir()}


def test_install_script_refuses_what_the_app_cannot_use(tmp_path):
    dest = tmp_path / "Model"
    env = {**os.environ, "MVKIT_MODEL_DIR": str(dest)}
    onnx_like = _fake_export(tmp_path, "not_coreml", target="onnx")
    r = subprocess.run([str(INSTALL), str(onnx_like)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "coreml" in r.stderr
    lonely = tmp_path / "lonely.mlpackage"
    lonely.mkdir()
    r = subprocess.run([str(INSTALL), str(lonely)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "manifest" in r.stderr
    r = subprocess.run([str(INSTALL)], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert not dest.exists() or not any(dest.iterdir()), "nothing is installed after a refusal"


def test_model_folder_contents_are_not_committed():
    ignore = (APP / "Model" / ".gitignore").read_text().split()
    assert "*" in ignore and "!.gitignore" in ignore


def test_workflow_builds_the_app_and_tests_the_package():
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ios.yml").read_text())
    (job,) = wf["jobs"].values()
    assert str(job["runs-on"]).startswith("macos")
    script = "\n".join(str(s.get("run", "")) for s in job["steps"])
    assert "swift test --package-path ios_demo/MobileViTKit" in script
    assert "python -m mobilevit_deploy.export --target coreml" in script
    assert "ios_demo/scripts/install_model.sh" in script
    assert re.search(r"xcodebuild .*-project ios_demo/MobileViTDemo.xcodeproj", script)
    assert "-scheme MobileViTDemo" in script and "generic/platform=iOS Simulator" in script
    assert "CODE_SIGNING_ALLOWED=NO" in script


def test_xcodegen_spec_agrees_with_the_project(pbx):
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load((IOS / "project.yml").read_text())
    objects = pbx["objects"]
    target = objects[objects[pbx["rootObject"]]["targets"][0]]
    release = next(objects[c] for c in objects[target["buildConfigurationList"]]["buildConfigurations"]
                   if objects[c]["name"] == "Release")["buildSettings"]
    t = spec["targets"]["MobileViTDemo"]
    assert spec["options"]["deploymentTarget"]["iOS"] == "17.0"
    assert spec["packages"]["MobileViTKit"]["path"] == "MobileViTKit"
    for key in ("PRODUCT_BUNDLE_IDENTIFIER", "COREML_CODEGEN_LANGUAGE", "INFOPLIST_KEY_NSCameraUsageDescription"):
        assert str(t["settings"]["base"][key]) == release[key], key
