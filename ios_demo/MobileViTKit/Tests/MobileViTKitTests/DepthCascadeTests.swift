import Foundation
import XCTest
@testable import MobileViTKit

/// Depth cascades (`kind: depth`): stage 1 (`exit_3`) takes the image and returns probabilities and
/// features; stage 2 (`rest_3`) takes those features; `whole_model` (`forward`) is the reference.
final class DepthCascadeTests: XCTestCase {
    private func fixture() throws -> Manifest { try Manifest.load(contentsOf: Fixtures.url("depth_cascade_manifest")) }

    /// The threshold as the fixture's JSON writes it.
    private func fixtureThreshold() throws -> Double {
        let c = try XCTUnwrap(Fixtures.object("depth_cascade_manifest")["cascade"] as? [String: Any])
        return try XCTUnwrap((c["exit_rule"] as? [String: Any])?["threshold"] as? Double)
    }

    /// Ten probabilities summing to 1 whose largest is `top`, at class `index`.
    private func probabilities(top: Double, at index: Int = 0) -> [Double] {
        var p = [Double](repeating: (1 - top) / 9, count: 10)
        p[index] = top
        return p
    }

    /// A stage runner that records what each stage was given and answers from `outputs` (per stage:
    /// scores, features). Images are the prepared sizes; features are strings naming their stage.
    private final class FakeRunner: CascadeStageRunner {
        var outputs: [Int: ([Double], String?)]
        var prepared: [[Int]] = []
        var given: [(stage: String, input: String, featuresWanted: Bool)] = []

        init(outputs: [Int: ([Double], String?)]) { self.outputs = outputs }

        func prepare(_ step: CascadeStep) throws -> [Int] {
            prepared.append([step.preprocessing.height, step.preprocessing.width])
            return [step.preprocessing.height, step.preprocessing.width]
        }

        func run(_ step: CascadeStep, input: CascadeStageInput<[Int], String>) throws -> CascadeStageOutput<String> {
            switch input {
            case .image(let size): given.append((step.stage.name, "image \(size)", step.featuresWanted))
            case .features(let f, let from): given.append((step.stage.name, "\(f) from \(from)", step.featuresWanted))
            }
            let (scores, features) = outputs[step.index]!
            return CascadeStageOutput(scores: scores, features: features)
        }
    }

    /// 0, then +steps[i] after the i-th reading (three readings per stage: prepare, run, gap).
    private final class FakeClock {
        var now: UInt64 = 0
        var steps: [UInt64]
        var readings = 0
        init(steps: [UInt64]) { self.steps = steps }
        func read() -> UInt64 {
            let t = now
            if readings < steps.count { now += steps[readings] }
            readings += 1
            return t
        }
    }

    // MARK: - Manifest

    func testDepthFixtureDecodes() throws {
        let m = try fixture()
        let c = try XCTUnwrap(m.cascade)
        XCTAssertEqual(c.kind, .depth)
        XCTAssertEqual(c.stages.count, 2)
        XCTAssertEqual(c.stages.map(\.name), ["exit_3", "rest_3"])
        XCTAssertEqual(c.stages.map(\.input), ["image", "features"])
        XCTAssertEqual(c.stages.map(\.takesFeatures), [false, true])
        XCTAssertEqual(c.stages[1].featuresFrom, "exit_3")
        XCTAssertNil(c.stages[0].featuresFrom)
        XCTAssertEqual(c.stages[1].featuresShape, [1, 48, 8, 8])
        XCTAssertEqual(c.stages[0].outputs, ["logits", "features"])
        XCTAssertEqual(c.stages.map(\.inputSize), [[64, 64], [64, 64]], "rest_3 answers for exit_3's image")
        XCTAssertEqual(c.wholeModel, .init(name: "forward", inputSize: [64, 64]))
        XCTAssertEqual(c.wholeModelName, "forward")
        XCTAssertTrue(c.wholeModelIsSeparate)
        XCTAssertEqual(c.benchmarkCount, 3)
        XCTAssertEqual(c.exitRule.kind, "max_probability")
        XCTAssertEqual(c.threshold, 0.15321038203470116, "exactly the fixture's")
        // (JSONSerialization, which the other tests read the fixture with, may be an ulp off on Linux)
        XCTAssertClose(c.threshold, try fixtureThreshold(), tol: 1e-15)
        XCTAssertEqual(c.thresholdSelection?.exitRates, [1.0, 0.0])
        XCTAssertEqual(m.outputKind, .probabilities)
        XCTAssertEqual(c.stageDescription(0), "stage 1 of 2 (exit_3, 64×64)")
        XCTAssertEqual(c.stageDescription(1), "stage 2 of 2 (rest_3, features of exit_3)")
        XCTAssertEqual(c.wholeModelDescription, "whole model alone (forward)")
        XCTAssertEqual((0..<c.benchmarkCount).map(c.benchmarkDescription),
                       ["stage 1 of 2 (exit_3, 64×64)", "stage 2 of 2 (rest_3, features of exit_3)", "whole model alone (forward)"])
        XCTAssertEqual(c.summary,
                       "depth cascade, 2 stages: exit_3 64×64 → rest_3 on exit_3's features, exit at p ≥ 0.15, whole model forward")
        XCTAssertEqual(try Manifest.decode(from: JSONEncoder().encode(m)), m, "round trip")
    }

    func testSizeCascadeDefaults() throws {
        let c = try XCTUnwrap(Manifest.load(contentsOf: Fixtures.url("cascade_manifest")).cascade)
        XCTAssertEqual(c.kind, .sizes, "no kind means sizes")
        XCTAssertEqual(c.stages.map(\.input), ["image", "image"], "no input means image")
        XCTAssertNil(c.wholeModel)
        XCTAssertEqual(c.wholeModelName, "forward_64", "a size cascade's whole model is its last stage")
        XCTAssertFalse(c.wholeModelIsSeparate)
        XCTAssertEqual(c.benchmarkCount, 2)
        XCTAssertEqual(c.benchmarkDescription(1), "stage 2 of 2 (forward_64, 64×64)")
        // an explicit kind and inputs read the same
        var o = try Fixtures.object("cascade_manifest")
        var cascade = try XCTUnwrap(o["cascade"] as? [String: Any])
        cascade["kind"] = "sizes"
        cascade["stages"] = [["name": "forward_48", "input": "image", "input_size": [48, 48]],
                             ["name": "forward_64", "input": "image", "input_size": [64, 64]]]
        o["cascade"] = cascade
        XCTAssertEqual(try Manifest.decode(from: Fixtures.data(of: o)).cascade, c)
    }

    func testStageAndWholeModelManifests() throws {
        let m = try fixture()
        let s0 = m.stageManifest(0)
        XCTAssertEqual(s0.input.shape, [1, 3, 64, 64])
        XCTAssertEqual(s0.input.name, "image")
        XCTAssertEqual(s0.output.name, "probabilities", "the exit function's output")
        XCTAssertEqual(s0.outputKind, .probabilities)
        XCTAssertEqual(s0.output.shape, [1, 10])
        XCTAssertNil(s0.cascade)
        XCTAssertNoThrow(try s0.validate())
        let whole = m.wholeModelManifest
        XCTAssertEqual(whole.output.name, "classLabel_probs", "forward is a classifier")
        XCTAssertNil(whole.cascade)
        XCTAssertNoThrow(try whole.validate())
        // a size cascade's stages keep the manifest's output
        let sized = try Manifest.load(contentsOf: Fixtures.url("cascade_manifest"))
        XCTAssertEqual(sized.stageManifest(0).output, sized.output)
    }

    func testBadDepthSpecsAreRejected() throws {
        func rejects(in name: String = "depth_cascade_manifest", _ edit: (inout [String: Any]) throws -> Void, _ expect: [String],
                     file: StaticString = #filePath, line: UInt = #line) throws {
            var o = try Fixtures.object(name)
            var c = try XCTUnwrap(o["cascade"] as? [String: Any])
            try edit(&c)
            o["cascade"] = c
            XCTAssertThrowsError(try Manifest.decode(from: Fixtures.data(of: o)), file: file, line: line) { error in
                for e in expect {
                    XCTAssertTrue("\(error)".contains(e), "\(error) should mention \(e)", file: file, line: line)
                }
            }
        }
        func stage(_ c: inout [String: Any], _ i: Int, _ edit: (inout [String: Any]) -> Void) {
            var stages = c["stages"] as! [[String: Any]]
            edit(&stages[i])
            c["stages"] = stages
        }
        try rejects({ $0["kind"] = "width" }, ["cascade.kind", "unknown cascade kind \"width\"", "sizes, depth"])
        try rejects(in: "cascade_manifest", { $0["kind"] = "Depth" }, ["unknown cascade kind \"Depth\""])
        // the features stage first
        try rejects({ $0["stages"] = Array(($0["stages"] as! [[String: Any]]).reversed()) },
                    ["stage 1", "first stage of a depth cascade takes input \"image\", got \"features\""])
        try rejects({ c in stage(&c, 0) { s in s["input"] = "features" } }, ["first stage of a depth cascade takes input \"image\""])
        // a later stage that takes the image
        try rejects({ c in stage(&c, 1) { s in s["input"] = "image"; s["input_size"] = [64, 64] } },
                    ["stage 2", "later stage of a depth cascade takes input \"features\"", "got \"image\""])
        try rejects({ c in stage(&c, 1) { s in s["input"] = "image" } }, ["missing key", "stages", "input_size"])
        // features from the wrong stage, or from none
        try rejects({ c in stage(&c, 1) { s in s["features_from"] = "exit_2" } },
                    ["stage 2", "features_from must be the previous stage's name \"exit_3\", got \"exit_2\""])
        try rejects({ c in stage(&c, 1) { s in s["features_from"] = "rest_3" } }, ["features_from must be the previous stage's name"])
        try rejects({ c in stage(&c, 1) { s in s.removeValue(forKey: "features_from") } },
                    ["features_from must be the previous stage's name \"exit_3\", got none"])
        // the whole model
        try rejects({ $0.removeValue(forKey: "whole_model") }, ["a depth cascade needs whole_model.name"])
        try rejects({ $0["whole_model"] = ["input_size": [64, 64]] }, ["cascade.whole_model.name"])
        try rejects({ $0["whole_model"] = ["name": ""] }, ["whole_model.name"])
        try rejects({ $0["whole_model"] = ["name": "forward", "input_size": [32, 32]] }, ["whole_model.input_size [32, 32] differs"])
        // other stage problems
        try rejects({ c in stage(&c, 1) { s in s["input"] = "tensor"; s["input_size"] = [64, 64] } },
                    ["input must be \"image\" or \"features\", got \"tensor\""])
        try rejects({ c in stage(&c, 1) { s in s["features_shape"] = [48, 8, 8] } }, ["features_shape must be [N, C, H, W]"])
        try rejects({ c in stage(&c, 1) { s in s["input_size"] = [32, 32] } }, ["differs from the image size of stage 1"])
        try rejects({ $0["stages"] = [($0["stages"] as! [[String: Any]])[0]] }, ["at least 2 stages, got 1"])
        // a size cascade passes no features
        try rejects(in: "cascade_manifest", { c in stage(&c, 1) { s in s["input"] = "features"; s["features_from"] = "forward_48" } },
                    ["stage 2", "a size cascade's stages take input \"image\", got \"features\""])
        try rejects(in: "cascade_manifest", { c in c["kind"] = "sizes"; stage(&c, 0) { s in s["input"] = "features" } },
                    ["stage 1", "a size cascade's stages take input \"image\""])

        // and directly, with typed errors
        let spec = try XCTUnwrap(fixture().cascade)
        var noWhole = spec
        noWhole.wholeModel = nil
        XCTAssertThrowsError(try noWhole.validate()) {
            XCTAssertEqual($0 as? CascadeError,
                           .inconsistent("a depth cascade needs whole_model.name (the function of the whole model alone, e.g. \"forward\")"))
        }
        var asSizes = spec
        asSizes.kind = .sizes
        XCTAssertThrowsError(try asSizes.validate()) {
            guard case .badStage(index: 1, _)? = $0 as? CascadeError else { return XCTFail("\($0)") }
        }
        XCTAssertNoThrow(try spec.validate(inputSize: [64, 64]))
    }

    // MARK: - Driver

    func testConfidentExitStageAnswersAlone() throws {
        let m = try fixture()
        let t = try fixtureThreshold()
        let runner = FakeRunner(outputs: [0: (probabilities(top: t + 0.01, at: 3), "exit_3 features"),
                                          1: (probabilities(top: 0.9), nil)])
        let clock = FakeClock(steps: [1_000_000, 3_000_000])
        let r = try m.runCascade(topK: 3, clock: clock.read, runner: runner)
        XCTAssertEqual(runner.given.map(\.stage), ["exit_3"], "only one stage ran")
        XCTAssertEqual(runner.given[0].input, "image [64, 64]")
        XCTAssertTrue(runner.given[0].featuresWanted, "rest_3 would take exit_3's features")
        XCTAssertEqual(runner.prepared, [[64, 64]])
        XCTAssertEqual(r.answeringStage, 0)
        XCTAssertEqual(r.stageCount, 2)
        XCTAssertEqual(r.runs.count, 1)
        XCTAssertEqual(r.predictions.first?.label, "cat")
        XCTAssertClose(r.predictions[0].probability, t + 0.01)
        XCTAssertClose(r.answeringRun.maxProbability, t + 0.01)
        XCTAssertClose(r.answeringRun.preprocessingMs, 1)
        XCTAssertClose(r.answeringRun.inferenceMs, 3)
        XCTAssertNil(r.answeringRun.featuresFrom)
        XCTAssertEqual(r.answerDescription, "stage 1 of 2 (exit_3, 64×64)")
    }

    func testUnsureExitStageHandsItsFeaturesToTheRest() throws {
        let m = try fixture()
        let t = try fixtureThreshold()
        let runner = FakeRunner(outputs: [0: (probabilities(top: t - 0.01, at: 3), "exit_3 features"),
                                          1: (probabilities(top: 0.6, at: 9), nil)])
        // exit_3: prepare 1 ms, run 2 ms; rest_3: no preparing, run 5 ms
        let clock = FakeClock(steps: [1_000_000, 2_000_000, 0, 0, 5_000_000])
        let r = try m.runCascade(clock: clock.read, runner: runner)
        XCTAssertEqual(runner.given.map(\.stage), ["exit_3", "rest_3"])
        XCTAssertEqual(runner.given[1].input, "exit_3 features from exit_3", "rest_3 gets exit_3's features as returned")
        XCTAssertFalse(runner.given[1].featuresWanted)
        XCTAssertEqual(runner.prepared, [[64, 64]], "the image is prepared once, for exit_3 only")
        XCTAssertEqual(r.answeringStage, 1)
        XCTAssertEqual(r.runs.map(\.name), ["exit_3", "rest_3"])
        XCTAssertEqual(r.runs[1].featuresFrom, "exit_3")
        XCTAssertEqual(r.predictions.first?.label, "truck")
        XCTAssertClose(r.predictions[0].probability, 0.6)
        XCTAssertClose(r.runs[0].maxProbability, t - 0.01)
        XCTAssertEqual(r.stageLatencyMs, [2, 5])
        XCTAssertClose(r.preprocessingMs, 1)
        XCTAssertClose(r.inferenceMs, 7)
        XCTAssertEqual(r.answerDescription, "stage 2 of 2 (rest_3, features of exit_3)")
        XCTAssertEqual(m.cascade?.stageDescription(1), r.answerDescription)

        // the same runner on a size cascade: every stage gets the image at its own size, no features
        let sized = try Manifest.load(contentsOf: Fixtures.url("cascade_manifest"))
        let sizeRunner = FakeRunner(outputs: [0: (probabilities(top: 0.5), "unused"), 1: (probabilities(top: 0.5), nil)])
        let r2 = try sized.runCascade(clock: { 0 }, runner: sizeRunner)
        XCTAssertEqual(r2.answeringStage, 1)
        XCTAssertEqual(sizeRunner.given.map(\.input), ["image [48, 48]", "image [64, 64]"])
        XCTAssertEqual(sizeRunner.given.map(\.featuresWanted), [false, false])
        XCTAssertEqual(r2.runs.map(\.featuresFrom), [nil, nil])
    }

    func testMissingFeaturesAreReported() throws {
        let m = try fixture()
        let t = try fixtureThreshold()
        let unsure = probabilities(top: t / 2)
        let runner = FakeRunner(outputs: [0: (unsure, nil), 1: (unsure, nil)])
        XCTAssertThrowsError(try m.runCascade(clock: { 0 }, runner: runner)) {
            XCTAssertEqual($0 as? CascadeError, .stageOutput(stage: "exit_3", "returned no features for rest_3"))
        }
        XCTAssertEqual(runner.given.map(\.stage), ["exit_3"])
        // the scores-only closures cannot pass features
        XCTAssertThrowsError(try m.runCascade(clock: { 0 }, prepare: { _ in () }, runStage: { _, _ in unsure })) {
            XCTAssertEqual($0 as? CascadeError, .stageOutput(stage: "exit_3", "returned no features for rest_3"))
        }
        // but a confident exit needs none
        let r = try m.runCascade(clock: { 0 }, prepare: { _ in () }, runStage: { _, _ in self.probabilities(top: 0.9) })
        XCTAssertEqual(r.answeringStage, 0)
    }

    // MARK: - Benchmark and report

    func testBenchmarkReferenceIsTheWholeModel() throws {
        let m = try fixture()
        let spec = try XCTUnwrap(m.cascade)
        let method = BenchmarkMethod(warmup: 0, rounds: 2, inferencesPerRound: 3, trimLow: 0, trimHigh: 1)
        let exit = try BenchmarkStats(method: method, timingsMs: [[1, 1, 9], [1, 1, 9]])
        let rest = try BenchmarkStats(method: method, timingsMs: [[3, 3, 9], [3, 3, 9]])
        let whole = try BenchmarkStats(method: method, timingsMs: [[3.5, 3.5, 9], [3.5, 3.5, 9]])
        XCTAssertThrowsError(try CascadeBenchmark(spec: spec, stageStats: [exit, rest])) {
            XCTAssertTrue("\($0)".contains("whole model alone (forward)"), "\($0)")
        }
        let bench = try CascadeBenchmark(spec: spec, stageStats: [exit, rest], wholeModelStats: whole)
        XCTAssertEqual(bench.referenceStats, whole)
        XCTAssertEqual(bench.stageLatencyMs, [1, 3])
        XCTAssertEqual(bench.exitRates, [1, 0])
        XCTAssertClose(try XCTUnwrap(bench.expectedLatencyMs), 1)
        XCTAssertEqual(bench.stageSummary(0), "1.00 ms · answers 100%")
        XCTAssertEqual(bench.stageSummary(1), "3.00 ms · answers 0%")

        let device = DeviceCatalog.device(identifier: "iPhone13,2", isSimulator: false, os: "iOS 18.1")
        let report = DeviceReport(manifest: m, device: device, computeUnits: .all, cascade: bench,
                                  created: Date(timeIntervalSince1970: 1_795_462_800))
        XCTAssertEqual(report.statsMs, whole.stats, "the top level is the whole model alone")
        XCTAssertEqual(report.roundsMs, whole.roundsMs)
        XCTAssertEqual(report.inputSize, [64, 64])
        XCTAssertEqual(report.cascade?.stageLatencyMs, [1, 3])
        XCTAssertEqual(report.cascade?.threshold, spec.threshold)
        XCTAssertEqual(try DeviceReport.decode(from: report.encoded()), report)

        // a size cascade's whole model is its last stage: no separate benchmark
        let sized = try XCTUnwrap(Manifest.load(contentsOf: Fixtures.url("cascade_manifest")).cascade)
        XCTAssertThrowsError(try CascadeBenchmark(spec: sized, stageStats: [exit, rest], wholeModelStats: whole))
        XCTAssertEqual(try CascadeBenchmark(spec: sized, stageStats: [exit, rest]).referenceStats, rest)
    }
}
