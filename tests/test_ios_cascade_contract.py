"""The manifest `cascade` section and the device report's `cascade` object (docs/contracts.md §1, §2)
against the Swift side (ios_demo/MobileViTKit, Cascade.swift).

Without Swift: the Swift test fixture `cascade_manifest.json` and the contract's examples are checked
against the keys and types the Swift decoder requires (an independent Python statement of its rules,
which also rejects the bad variants the Swift tests reject). With a Swift toolchain: the package's
CLIs decode the fixture and write a cascade device report that the Python harness accepts.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ios_demo" / "MobileViTKit"
FIXTURE = PKG / "Tests" / "MobileViTKitTests" / "Fixtures" / "cascade_manifest.json"
DEPTH_FIXTURE = FIXTURE.with_name("depth_cascade_manifest.json")  # a real `export --target coreml --cascade exit3`
PLAIN_FIXTURE = FIXTURE.with_name("manifest.json")
CONTRACTS = ROOT / "docs" / "contracts.md"

EXIT_RULE_KINDS = {"max_probability"}
# what DeviceReport.Cascade encodes
REPORT_CASCADE_KEYS = {"exit_rates", "stage_latency_ms", "mean_latency_ms", "threshold", "exit_rates_source"}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return type(x) is int


def _jsonc_blocks() -> list[dict]:
    """The ```jsonc examples of docs/contracts.md (the cascade additions), `//` comments stripped."""
    text = CONTRACTS.read_text(encoding="utf-8")
    out = []
    for raw in re.findall(r"```jsonc\n(.*?)```", text, re.S):
        out.append(json.loads("\n".join(re.sub(r"\s//.*$", "", line) for line in raw.splitlines())))
    return out


def _json_block(n: int) -> dict:
    """The n-th (1-based) ```json example of docs/contracts.md, as tests/test_ios_contract.py reads it."""
    raw = re.findall(r"```json\n(.*?)```", CONTRACTS.read_text(encoding="utf-8"), re.S)[n - 1]
    return json.loads("\n".join(re.sub(r"\s//.*$", "", line) for line in raw.splitlines()))


CASCADE_KINDS = {"sizes", "depth"}  # absent kind = "sizes"
STAGE_INPUTS = {"image", "features"}


def check_cascade(c: dict, input_hw: list[int] | None = None):
    """What `CascadeSpec` decoding + `validate(inputSize:)` require; AssertionError names the problem."""
    assert isinstance(c, dict), "cascade must be an object"
    kind = c.get("kind", "sizes")
    assert kind in CASCADE_KINDS, f"unknown cascade kind {kind!r}"
    stages = c["stages"]
    assert isinstance(stages, list) and len(stages) >= 2, f"at least 2 stages, got {stages!r}"
    names = set()
    for i, s in enumerate(stages):
        assert isinstance(s["name"], str) and s["name"], f"stage {i + 1}: name must be a non-empty string"
        assert s["name"] not in names, f"stage {i + 1}: name {s['name']!r} is used twice"
        names.add(s["name"])
        inp = s.get("input", "image")
        assert inp in STAGE_INPUTS, f"stage {i + 1}: unknown input {inp!r}"
        if kind == "depth" and i:
            assert inp == "features", f"stage {i + 1} of a depth cascade must take features, got {inp!r}"
            assert s.get("features_from") == stages[i - 1]["name"], (
                f"stage {i + 1}: features_from must name the stage before it, got {s.get('features_from')!r}")
            continue
        assert inp == "image", f"stage {i + 1} must take the image, got {inp!r}"
        size = s["input_size"]
        assert isinstance(size, list) and len(size) == 2 and all(_int(v) and v > 0 for v in size), (
            f"stage {i + 1}: input_size must be [H, W] with positive ints, got {size!r}")
        if i:
            prev = stages[i - 1]["input_size"]
            assert size[0] > prev[0] and size[1] > prev[1], f"stage sizes must strictly increase: {prev} -> {size}"
    if kind == "depth":
        whole = c.get("whole_model")
        assert isinstance(whole, dict) and isinstance(whole.get("name"), str) and whole["name"], (
            "a depth cascade needs whole_model.name")
        if input_hw is not None:
            assert stages[0]["input_size"] == list(input_hw), "the exit stage's input_size must equal input.shape[2:]"
    elif input_hw is not None:
        assert stages[-1]["input_size"] == list(input_hw), "the last stage's input_size must equal input.shape[2:]"
    rule = c["exit_rule"]
    assert rule["kind"] in EXIT_RULE_KINDS, f"unknown exit rule kind {rule['kind']!r}"
    t = rule["threshold"]
    assert _number(t) and 0 <= t <= 1, f"threshold must be a number in [0, 1], got {t!r}"
    ts = c.get("threshold_selection")
    if ts is not None:
        assert isinstance(ts, dict)
        for key, ok in (("data", lambda v: isinstance(v, str)), ("images", _int), ("max_drop_points", _number),
                        ("last_stage_top1", _number), ("cascade_top1", _number)):
            if ts.get(key) is not None:
                assert ok(ts[key]), f"threshold_selection.{key} has the wrong type: {ts[key]!r}"
        rates = ts.get("exit_rates")
        if rates is not None:
            assert isinstance(rates, list) and len(rates) == len(stages), "one exit rate per stage"
            assert all(_number(r) and 0 <= r <= 1 for r in rates) and abs(sum(rates) - 1) <= 0.01, rates


def check_report_cascade(c: dict, stages: int | None = None):
    assert set(c) == REPORT_CASCADE_KEYS, set(c) ^ REPORT_CASCADE_KEYS
    assert all(_number(x) and 0 <= x <= 1 for x in c["exit_rates"]) and abs(sum(c["exit_rates"]) - 1) <= 0.01
    assert all(_number(x) and x > 0 for x in c["stage_latency_ms"])
    assert len(c["exit_rates"]) == len(c["stage_latency_ms"]) == (stages or len(c["exit_rates"]))
    assert _number(c["mean_latency_ms"]) and c["mean_latency_ms"] > 0
    assert _number(c["threshold"]) and 0 <= c["threshold"] <= 1
    assert c["exit_rates_source"] in ("threshold_selection", "measured")


def expected_latency(stage_ms, rates) -> float:
    reach, total = 1.0, 0.0
    for ms, r in zip(stage_ms, rates):
        total += reach * ms
        reach -= r
    return total


# --------------------------------------------------------------------------------------------------
# no Swift needed


def test_fixture_is_a_contract_manifest_with_a_cascade():
    fixture = json.loads(FIXTURE.read_text())
    example = _json_block(1)
    assert set(fixture) == set(example) | {"cascade"}
    for k in ("input", "output", "artifact", "checkpoint", "verification"):
        assert set(fixture[k]) == set(example[k]), k
    assert len(fixture["labels"]) == fixture["output"]["shape"][-1]
    shape = fixture["input"]["shape"]
    assert len(shape) == 4 and shape[1] == 3
    check_cascade(fixture["cascade"], input_hw=shape[2:])
    assert fixture["cascade"]["stages"][-1]["input_size"] == shape[2:], "input.shape is the last stage's"
    assert "cascade" not in json.loads(PLAIN_FIXTURE.read_text()), "ordinary artifacts have no cascade section"


def test_contract_examples_match_the_fixture_and_the_swift_report():
    blocks = _jsonc_blocks()
    manifest_part = next(b["cascade"] for b in blocks if "stages" in b.get("cascade", {}))
    report_part = next(b["cascade"] for b in blocks if "exit_rates" in b.get("cascade", {}))
    fixture = json.loads(FIXTURE.read_text())["cascade"]
    assert set(manifest_part) == set(fixture)
    assert set(manifest_part["exit_rule"]) == set(fixture["exit_rule"]) == {"kind", "threshold"}
    assert set(manifest_part["threshold_selection"]) == set(fixture["threshold_selection"])
    assert all(set(s) == {"name", "input_size"} for s in manifest_part["stages"] + fixture["stages"])
    check_cascade(manifest_part)
    check_report_cascade(report_part)
    assert report_part["mean_latency_ms"] == pytest.approx(
        expected_latency(report_part["stage_latency_ms"], report_part["exit_rates"]), abs=1e-3)
    # the cascade additions must not disturb the examples tests/test_ios_contract.py reads
    assert "cascade" not in _json_block(1) and "cascade" not in _json_block(2)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(stages=c["stages"][:1]), "at least 2 stages"),
    (lambda c: c["stages"][1].update(input_size=[48, 48]), "strictly increase"),
    (lambda c: c["stages"][0].update(input_size=[80, 80]), "strictly increase"),
    (lambda c: c["stages"][1].update(name="forward_48"), "used twice"),
    (lambda c: c["stages"][0].update(input_size=[48]), "input_size"),
    (lambda c: c["exit_rule"].update(threshold=1.000001), "threshold"),
    (lambda c: c["exit_rule"].update(kind="entropy"), "unknown exit rule kind"),
    (lambda c: c["threshold_selection"].update(exit_rates=[1.0]), "one exit rate per stage"),
])
def test_checker_rejects_what_swift_rejects(edit, message):
    _check_edited(FIXTURE, edit, message)


def _check_edited(path, edit, message):
    """`check_cascade` rejects the fixture at `path` with `edit` applied to its cascade section."""
    fixture = json.loads(path.read_text())
    c = copy.deepcopy(fixture["cascade"])
    edit(c)
    with pytest.raises(AssertionError, match=message):
        check_cascade(c, input_hw=fixture["input"]["shape"][2:])


def test_depth_fixture_is_a_contract_manifest_with_a_depth_cascade():
    fixture = json.loads(DEPTH_FIXTURE.read_text())
    c = fixture["cascade"]
    check_cascade(c, input_hw=fixture["input"]["shape"][2:])
    assert c["kind"] == "depth" and [s["input"] for s in c["stages"]] == ["image", "features"]
    assert c["whole_model"]["name"] in fixture["coreml_functions"]
    assert [s["name"] for s in c["stages"]] + [c["whole_model"]["name"]] == fixture["coreml_functions"]
    example = next(b["cascade"] for b in _jsonc_blocks() if b.get("cascade", {}).get("kind") == "depth")
    check_cascade(example, input_hw=[64, 64])  # docs/contracts.md's depth example
    assert set(example) == set(c) and all(set(a) == set(b) for a, b in zip(example["stages"], c["stages"]))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(kind="tokens"), "unknown cascade kind"),
    (lambda c: c["stages"][0].update(input="features"), "must take the image"),
    (lambda c: c["stages"][1].update(input="image"), "must take features"),
    (lambda c: c["stages"][1].update(features_from="forward"), "features_from"),
    (lambda c: c.pop("whole_model"), "whole_model"),
    (lambda c: c["stages"][0].update(input="pixels"), "unknown input"),
])
def test_checker_rejects_bad_depth_cascades(edit, message):
    _check_edited(DEPTH_FIXTURE, edit, message)


def test_checker_rejects_a_size_cascade_stage_taking_features():
    _check_edited(FIXTURE, lambda c: c["stages"][1].update(input="features"), "must take the image")


def test_python_threshold_choice_fits_the_swift_decoder():
    """`mobilevit_deploy.cascade` (threshold choice and its manifest block) produces what Swift decodes."""
    np = pytest.importorskip("numpy")
    cascade = pytest.importorskip("mobilevit_deploy.cascade")
    s1 = np.array([[0.95, 0.05], [0.90, 0.10], [0.60, 0.40], [0.55, 0.45]])
    s2 = np.array([[0.80, 0.20], [0.30, 0.70], [0.40, 0.60], [0.20, 0.80]])
    choice = cascade.choose_threshold([s1, s2], np.array([0, 1, 1, 1]), max_drop_points=0.5)
    section = {
        "stages": [{"name": "forward_48", "input_size": [48, 48]}, {"name": "forward_64", "input_size": [64, 64]}],
        "exit_rule": {"kind": cascade.EXIT_RULE, "threshold": float(choice.threshold)},
        "threshold_selection": choice.to_manifest("val", 4),
    }
    check_cascade(json.loads(json.dumps(section)), input_hw=[64, 64])
    # Python's expected cost and the Swift report's mean_latency_ms are the same formula
    out = choice.outcome
    assert out.cost([2.0, 5.0]) == pytest.approx(expected_latency([2.0, 5.0], out.exit_rates))


# --------------------------------------------------------------------------------------------------
# with a Swift toolchain


def _find_swift() -> str | None:
    found = shutil.which("swift")
    if found:
        return found
    opt = Path("/opt/swift/usr/bin/swift")
    return str(opt) if opt.is_file() and os.access(opt, os.X_OK) else None


@pytest.fixture(scope="module")
def swift_bins():
    swift = _find_swift()
    if swift is None:
        pytest.skip("no Swift toolchain (swift not on PATH, no /opt/swift/usr/bin/swift): "
                    "the Swift side of the cascade contract is not checked here")
    build = subprocess.run([swift, "build", "--package-path", str(PKG)], capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, f"swift build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    binpath = subprocess.run([swift, "build", "--package-path", str(PKG), "--show-bin-path"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return {name: Path(binpath) / name for name in ("mvkit-report", "mvkit-manifest")}


def _run(cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


def test_swift_decodes_the_fixture_cascade_and_rejects_bad_ones(swift_bins, tmp_path):
    r = _run([swift_bins["mvkit-manifest"], "--json", FIXTURE])
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    fixture = json.loads(FIXTURE.read_text())
    c = fixture["cascade"]
    assert j["cascade"] == {
        "stages": [s["name"] for s in c["stages"]], "input_sizes": [s["input_size"] for s in c["stages"]],
        "exit_rule": c["exit_rule"]["kind"], "threshold": c["exit_rule"]["threshold"],
        "exit_rates": c["threshold_selection"]["exit_rates"]}
    assert j["input_size"] == c["stages"][-1]["input_size"]
    assert "cascade" not in json.loads(_run([swift_bins["mvkit-manifest"], "--json", PLAIN_FIXTURE]).stdout)

    for edit, message in ((lambda c: c["exit_rule"].update(kind="entropy"), "entropy"),
                          (lambda c: c["exit_rule"].update(threshold=1.5), "[0, 1]"),
                          (lambda c: c.update(stages=c["stages"][:1]), "at least 2 stages")):
        bad = copy.deepcopy(fixture)
        edit(bad["cascade"])
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        r = _run([swift_bins["mvkit-manifest"], p])
        assert r.returncode == 1 and message in r.stderr, r.stderr


def test_swift_decodes_the_depth_fixture_and_rejects_bad_ones(swift_bins, tmp_path):
    fixture = json.loads(DEPTH_FIXTURE.read_text())
    c = fixture["cascade"]
    r = _run([swift_bins["mvkit-manifest"], "--json", DEPTH_FIXTURE])
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)["cascade"]
    assert j["kind"] == "depth" and j["stages"] == [s["name"] for s in c["stages"]]
    assert j["inputs"] == ["image", "features"] and j["whole_model"] == c["whole_model"]["name"]
    assert j["threshold"] == pytest.approx(c["exit_rule"]["threshold"], rel=1e-12)
    for edit, message in ((lambda c: c.update(kind="tokens"), "tokens"),
                          (lambda c: c["stages"][1].update(features_from="forward"), "features_from"),
                          (lambda c: c.pop("whole_model"), "whole_model")):
        bad = copy.deepcopy(fixture)
        edit(bad["cascade"])
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(bad))
        r = _run([swift_bins["mvkit-manifest"], p])
        assert r.returncode == 1 and message in r.stderr, r.stderr


def test_swift_cascade_report_is_accepted_by_python(swift_bins, tmp_path):
    out = tmp_path / "report.json"
    r = _run([swift_bins["mvkit-report"], "--manifest", FIXTURE, "--synthetic", "--seed", "2", "--out", out])
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    fixture = json.loads(FIXTURE.read_text())
    assert set(d) == set(_json_block(2)) | {"cascade"}
    check_report_cascade(d["cascade"], stages=len(fixture["cascade"]["stages"]))
    assert d["cascade"]["exit_rates"] == fixture["cascade"]["threshold_selection"]["exit_rates"]
    assert d["cascade"]["threshold"] == fixture["cascade"]["exit_rule"]["threshold"]
    assert d["cascade"]["exit_rates_source"] == "threshold_selection"
    assert d["input_size"] == fixture["input"]["shape"][2:], "the top level is the last stage's"
    lat = d["cascade"]["stage_latency_ms"]
    assert lat[0] < lat[1], "synthetic timings scale with the stage's pixels"
    assert d["cascade"]["mean_latency_ms"] == pytest.approx(expected_latency(lat, d["cascade"]["exit_rates"]), abs=2e-4)
    assert d["stats_ms"]["mean"] == pytest.approx(lat[-1], abs=1e-3)

    dr = pytest.importorskip("mobilevit_deploy.bench.device_report")
    rep = dr.load_device_report(out)
    assert tuple(rep.input_size) == tuple(fixture["input"]["shape"][2:])
    assert not rep.is_iphone12
