import Foundation
import XCTest
@testable import MobileViTKit

final class CascadeTests: XCTestCase {
    private func fixture() throws -> Manifest { try Manifest.load(contentsOf: Fixtures.url("cascade_manifest")) }

    private func spec(threshold: Double = 0.8, sizes: [[Int]] = [[48, 48], [64, 64]]) -> CascadeSpec {
        CascadeSpec(stages: sizes.enumerated().map { .init(name: "stage\($0.offset)", inputSize: $0.element) },
                    exitRule: .maxProbability(threshold: threshold))
    }

    /// A clock that starts at 0 and advances by the next of `steps` (ns) after each reading. The driver
    /// reads it three times per stage (before prepare, before the stage, after it), so per stage the
    /// steps are: preprocessing, inference, gap.
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

    func testFixtureDecodes() throws {
        let m = try fixture()
        let c = try XCTUnwrap(m.cascade)
        XCTAssertEqual(c.stages.map(\.name), ["forward_48", "forward_64"])
        XCTAssertEqual(c.stages.map(\.inputSize), [[48, 48], [64, 64]])
        XCTAssertEqual(c.stages[0].height, 48)
        XCTAssertEqual(c.stages[1].width, 64)
        XCTAssertEqual(c.exitRule, .maxProbability(threshold: 0.83))
        XCTAssertEqual(c.exitRule.kind, "max_probability")
        XCTAssertEqual(c.threshold, 0.83)
        let ts = try XCTUnwrap(c.thresholdSelection)
        XCTAssertEqual(ts.data, "../shared/data/cifar10/val")
        XCTAssertEqual(ts.images, 1000)
        XCTAssertEqual(ts.maxDropPoints, 0.5)
        XCTAssertEqual(ts.lastStageTop1, 81.2)
        XCTAssertEqual(ts.cascadeTop1, 80.9)
        XCTAssertEqual(ts.exitRates, [0.71, 0.29])
        XCTAssertEqual([m.inputHeight, m.inputWidth], [64, 64], "input.shape is the last stage's")
        XCTAssertEqual(c.summary, "2 stages: forward_48 48×48 → forward_64 64×64, exit at p ≥ 0.83")
        XCTAssertNil(try Manifest.load(contentsOf: Fixtures.url("manifest")).cascade, "ordinary artifacts have none")
    }

    func testRoundTripAndUnknownKeys() throws {
        let m = try fixture()
        XCTAssertEqual(try Manifest.decode(from: JSONEncoder().encode(m)), m)
        var o = try Fixtures.object("cascade_manifest")
        var cascade = try XCTUnwrap(o["cascade"] as? [String: Any])
        cascade["future_key"] = ["x": 1]
        cascade.removeValue(forKey: "threshold_selection")
        o["cascade"] = cascade
        let m2 = try Manifest.decode(from: Fixtures.data(of: o))
        XCTAssertNil(m2.cascade?.thresholdSelection, "threshold_selection is optional")
        XCTAssertEqual(m2.cascade?.stages, m.cascade?.stages)
    }

    func testStageManifest() throws {
        let m = try fixture()
        let s0 = m.stageManifest(0)
        XCTAssertEqual(s0.input.shape, [1, 3, 48, 48])
        XCTAssertNil(s0.cascade)
        XCTAssertNoThrow(try s0.validate())
        XCTAssertEqual(s0.labels, m.labels)
        XCTAssertEqual(m.stageManifest(1).input.shape, m.input.shape)
    }

    func testBadSpecsAreRejected() throws {
        func rejects(_ edit: (inout [String: Any]) throws -> Void, _ expect: String,
                     file: StaticString = #filePath, line: UInt = #line) throws {
            var o = try Fixtures.object("cascade_manifest")
            var c = try XCTUnwrap(o["cascade"] as? [String: Any])
            try edit(&c)
            o["cascade"] = c
            XCTAssertThrowsError(try Manifest.decode(from: Fixtures.data(of: o)), file: file, line: line) { error in
                XCTAssertTrue("\(error)".contains(expect), "\(error) should mention \(expect)", file: file, line: line)
            }
        }
        let one: [[String: Any]] = [["name": "forward_64", "input_size": [64, 64]]]
        try rejects({ $0["stages"] = one }, "at least 2 stages, got 1")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [64, 64]], ["name": "b", "input_size": [64, 64]]] },
                    "strictly increase")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [80, 80]], ["name": "b", "input_size": [64, 64]]] },
                    "strictly increase")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [48, 64]], ["name": "b", "input_size": [64, 64]]] },
                    "strictly increase")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [48, 48]], ["name": "a", "input_size": [64, 64]]] },
                    "used twice")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [48]], ["name": "b", "input_size": [64, 64]]] },
                    "input_size must be [H, W]")
        try rejects({ $0["stages"] = [["name": "a", "input_size": [32, 32]], ["name": "b", "input_size": [48, 48]]] },
                    "differs from input.shape")
        try rejects({ $0["exit_rule"] = ["kind": "max_probability", "threshold": 1.000001] }, "must be in [0, 1]")
        try rejects({ $0["exit_rule"] = ["kind": "max_probability", "threshold": -0.1] }, "must be in [0, 1]")
        try rejects({ $0["exit_rule"] = ["kind": "entropy", "threshold": 0.5] }, "unknown cascade exit rule kind \"entropy\"")
        try rejects({ $0["exit_rule"] = ["kind": "entropy", "threshold": 0.5] }, "cascade.exit_rule.kind")
        try rejects({ $0["exit_rule"] = ["kind": "max_probability"] }, "cascade.exit_rule.threshold")
        try rejects({ $0["stages"] = [["input_size": [48, 48]], ["name": "b", "input_size": [64, 64]]] }, "name")
        try rejects({ $0["threshold_selection"] = ["exit_rates": [1.0]] }, "1 values for 2 stages")
        try rejects({ $0["threshold_selection"] = ["exit_rates": [0.5, 0.2]] }, "summing to 1")

        // and directly, with typed errors
        XCTAssertThrowsError(try spec(sizes: [[64, 64]]).validate()) { XCTAssertEqual($0 as? CascadeError, .tooFewStages(1)) }
        XCTAssertThrowsError(try spec(threshold: 1.5).validate()) { XCTAssertEqual($0 as? CascadeError, .thresholdOutOfRange(1.5)) }
        XCTAssertThrowsError(try spec(sizes: [[64, 64], [48, 48]]).validate()) {
            XCTAssertEqual($0 as? CascadeError, .sizesNotIncreasing(index: 1, previous: [64, 64], got: [48, 48]))
        }
        XCTAssertNoThrow(try spec(threshold: 0).validate())
        XCTAssertNoThrow(try spec(threshold: 1).validate())
        XCTAssertNoThrow(try spec(sizes: [[32, 32], [48, 64], [96, 128]]).validate())
    }

    // MARK: - Exit rule

    func testExitsAtOrAboveTheThresholdOnly() {
        let s = spec(threshold: 0.8, sizes: [[32, 32], [48, 48], [64, 64]])
        XCTAssertTrue(s.shouldExit(stageIndex: 0, probabilities: [0.8, 0.2]), "exactly at the threshold exits")
        XCTAssertTrue(s.shouldExit(stageIndex: 0, probabilities: [0.05, 0.95]))
        XCTAssertFalse(s.shouldExit(stageIndex: 0, probabilities: [0.79, 0.21]))
        XCTAssertFalse(s.shouldExit(stageIndex: 1, probabilities: [0.5, 0.5]))
        XCTAssertFalse(s.shouldExit(stageIndex: 0, probabilities: [.nan, 0.1]))
        XCTAssertFalse(s.shouldExit(stageIndex: 0, probabilities: []))
        XCTAssertTrue(s.shouldExit(stageIndex: 2, probabilities: [0.5, 0.5]), "the last stage always answers")
        XCTAssertTrue(s.shouldExit(stageIndex: 2, probabilities: []), "the last stage always answers")
        XCTAssertTrue(spec(threshold: 1).shouldExit(stageIndex: 1, probabilities: [0.1, 0.9]))
    }

    // MARK: - Driver

    func testEarlyExitRunsOneStageAndTimesIt() throws {
        let m = try fixture()
        // prepare takes 1 ms, the stage 4 ms
        let clock = FakeClock(steps: [1_000_000, 4_000_000])
        var ran: [String] = []
        var sizes: [[Int]] = []
        let probs: [Double] = [0.01, 0.9, 0.01, 0.01, 0.01, 0.02, 0.01, 0.01, 0.01, 0.01]
        let r = try m.runCascade(topK: 3, clock: clock.read,
                                 prepare: { step in sizes.append([step.preprocessing.height, step.preprocessing.width]); return step.index },
                                 runStage: { step, input in
                                     XCTAssertEqual(input, step.index)
                                     ran.append(step.stage.name)
                                     return probs
                                 })
        XCTAssertEqual(ran, ["forward_48"])
        XCTAssertEqual(sizes, [[48, 48]], "stage 1 is prepared at its own size")
        XCTAssertEqual(r.answeringStage, 0)
        XCTAssertEqual(r.stageCount, 2)
        XCTAssertEqual(r.predictions.map(\.label), ["automobile", "dog", "airplane"])
        XCTAssertClose(r.predictions[0].probability, 0.9)
        XCTAssertEqual(r.runs.count, 1)
        XCTAssertClose(r.answeringRun.preprocessingMs, 1)
        XCTAssertClose(r.answeringRun.inferenceMs, 4)
        XCTAssertClose(r.answeringRun.maxProbability, 0.9)
        XCTAssertEqual(r.stageLatencyMs, [4])
        XCTAssertEqual(r.answerDescription, "stage 1 of 2 (forward_48, 48×48)")
        XCTAssertEqual(m.cascade?.stageDescription(0), r.answerDescription)
    }

    func testLowConfidenceFallsThroughAndTheLastStageAlwaysAnswers() throws {
        let m = try fixture()
        let clock = FakeClock(steps: [1_000_000, 2_000_000, 0, 1_500_000, 5_000_000])
        var preps: [Preprocessing] = []
        // stage 1: 0.82 < 0.83; stage 2: unconfident, answers anyway
        let out: [[Double]] = [
            [0.82, 0.18, 0, 0, 0, 0, 0, 0, 0, 0],
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.15],
        ]
        let r = try m.runCascade(clock: clock.read, prepare: { preps.append($0.preprocessing); return $0.isLast },
                                 runStage: { step, _ in out[step.index] })
        XCTAssertEqual(r.answeringStage, 1)
        XCTAssertEqual(r.runs.map(\.name), ["forward_48", "forward_64"])
        XCTAssertEqual(r.predictions.first?.label, "truck")
        XCTAssertEqual(r.predictions.count, 5)
        XCTAssertEqual(r.stageLatencyMs, [2, 5])
        XCTAssertClose(r.inferenceMs, 7)
        XCTAssertClose(r.preprocessingMs, 2.5)
        XCTAssertEqual(r.answerDescription, "stage 2 of 2 (forward_64, 64×64)")
        // per-stage preprocessing is the manifest's at each stage's size
        XCTAssertEqual(preps.map { [$0.height, $0.width] }, [[48, 48], [64, 64]])
        XCTAssertEqual(preps[1], m.preprocessing)
        XCTAssertEqual(preps[0].cropPct, m.input.cropPct)
        // the same region of the photo at both sizes (up to integer rounding)
        let r0 = preps[0].cropRect(imageWidth: 640, imageHeight: 480)
        let r1 = preps[1].cropRect(imageWidth: 640, imageHeight: 480)
        XCTAssertClose(r0.height, r1.height, tol: 480 * 0.02)
        XCTAssertClose(r0.width, r1.width, tol: 640 * 0.02)
    }

    func testLogitsAreSoftmaxedBeforeTheRule() throws {
        let s = spec(threshold: 0.8)
        let m = try fixture()
        // softmax([ln 4, 0]) = [0.8, 0.2]: exactly at the threshold
        let logits: [Double] = [Foundation.log(4.0), 0]
        let labels = ["a", "b"]
        let r = try runCascade(s, preprocessing: m.preprocessing, outputKind: .logits, labels: labels, clock: { 0 },
                               prepare: { _ in () }, runStage: { _, _ in logits })
        XCTAssertEqual(r.answeringStage, 0)
        XCTAssertClose(r.predictions[0].probability, 0.8, tol: 1e-12)
        // the same numbers read as probabilities are renormalised: 1.386/1.386 = 1.0 -> exits too;
        // logits just below: softmax([ln 3.9, 0]) < 0.8 -> falls through
        let below: [Double] = [Foundation.log(3.9), 0]
        let r2 = try runCascade(s, preprocessing: m.preprocessing, outputKind: .logits, labels: labels, clock: { 0 },
                                prepare: { _ in () }, runStage: { _, _ in below })
        XCTAssertEqual(r2.answeringStage, 1)
    }

    func testStageErrorsAreReported() throws {
        let m = try fixture()
        XCTAssertThrowsError(try m.runCascade(clock: { 0 }, prepare: { _ in () }, runStage: { _, _ in [0.5, 0.5] })) {
            XCTAssertTrue("\($0)".contains("forward_48: returned 2 scores for 10 labels"), "\($0)")
        }
        XCTAssertThrowsError(try Manifest.load(contentsOf: Fixtures.url("manifest"))
            .runCascade(prepare: { _ in () }, runStage: { _, _ in [] })) {
            XCTAssertEqual($0 as? CascadeError, .notACascade)
        }
    }

    // MARK: - Statistics and report

    private func result(answering: Int, latencies: [Double]) -> CascadeResult {
        CascadeResult(answeringStage: answering, stageCount: 2, predictions: [],
                      runs: latencies.enumerated().map {
                          CascadeStageRun(index: $0.offset, name: "s\($0.offset)", inputSize: [1, 1], maxProbability: 0.5,
                                          preprocessingMs: 0.5, inferenceMs: $0.element)
                      })
    }

    func testExitRatesAndMeanLatencyFromResults() throws {
        // Four images through the driver with an injected clock: stage 1 takes 2 ms, stage 2 takes 6 ms.
        let m = try fixture()
        let confident: [Double] = [0.9, 0.1, 0, 0, 0, 0, 0, 0, 0, 0]
        let unsure: [Double] = [0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0]
        let images: [[Double]] = [confident, unsure, confident, confident]
        var results: [CascadeResult] = []
        for first in images {
            let clock = FakeClock(steps: [0, 2_000_000, 0, 0, 6_000_000])
            results.append(try m.runCascade(clock: clock.read, prepare: { _ in () },
                                            runStage: { step, _ in step.index == 0 ? first : unsure }))
        }
        let s = try CascadeStats(results: results, stageCount: 2)
        XCTAssertEqual(s.images, 4)
        XCTAssertEqual(s.exitCounts, [3, 1])
        XCTAssertEqual(s.exitRates, [0.75, 0.25])
        XCTAssertEqual(s.stageLatencyMs, [2, 6])
        XCTAssertClose(s.meanLatencyMs, (2 + 8 + 2 + 2) / 4.0)
        XCTAssertClose(s.latency.median, 2)
        XCTAssertClose(s.latency.max, 8)
        // the expected latency from rates and stage means agrees with the measured mean
        XCTAssertClose(CascadeSpec.expectedLatencyMs(stageLatencyMs: [2, 6], exitRates: s.exitRates), s.meanLatencyMs)

        let rep = try DeviceReport.Cascade(stats: s, threshold: 0.83)
        XCTAssertEqual(rep.exitRates, [0.75, 0.25])
        XCTAssertEqual(rep.stageLatencyMs, [2, 6])
        XCTAssertClose(rep.meanLatencyMs, 3.5)
        XCTAssertEqual(rep.exitRatesSource, "measured")
    }

    func testStatsEdgeCases() throws {
        XCTAssertThrowsError(try CascadeStats(results: [], stageCount: 2)) { XCTAssertEqual($0 as? CascadeError, .noResults) }
        let allEarly = try CascadeStats(results: [result(answering: 0, latencies: [1]), result(answering: 0, latencies: [3])],
                                        stageCount: 2)
        XCTAssertEqual(allEarly.exitRates, [1, 0])
        XCTAssertEqual(allEarly.stageLatencyMs, [2, nil], "no image reached stage 2")
        XCTAssertThrowsError(try DeviceReport.Cascade(stats: allEarly, threshold: 0.5)) {
            XCTAssertEqual($0 as? CascadeError, .unreachedStage("2"))
        }
        XCTAssertThrowsError(try CascadeStats(results: [result(answering: 1, latencies: [1])], stageCount: 2))
    }

    func testExpectedLatencyMatchesPythonCost() {
        // mobilevit_deploy.cascade.CascadeOutcome.cost: rates (0.25, 0.75), costs (1, 2) -> 1 + 0.75 * 2
        XCTAssertClose(CascadeSpec.expectedLatencyMs(stageLatencyMs: [1, 2], exitRates: [0.25, 0.75]), 2.5)
        XCTAssertClose(CascadeSpec.expectedLatencyMs(stageLatencyMs: [1, 2], exitRates: [1, 0]), 1)
        XCTAssertClose(CascadeSpec.expectedLatencyMs(stageLatencyMs: [1, 2, 4], exitRates: [0.5, 0.25, 0.25]),
                       1 + 0.5 * 2 + 0.25 * 4)
    }

    func testDeviceReportWithCascade() throws {
        let m = try fixture()
        let method = BenchmarkMethod(warmup: 0, rounds: 2, inferencesPerRound: 3, trimLow: 0, trimHigh: 1)
        let small = try BenchmarkStats(method: method, timingsMs: [[2, 2, 9], [2, 2, 9]])
        let large = try BenchmarkStats(method: method, timingsMs: [[5, 5, 9], [4, 4, 9]])
        let bench = try CascadeBenchmark(spec: XCTUnwrap(m.cascade), stageStats: [small, large])
        XCTAssertEqual(bench.stageLatencyMs, [2, 4.5])
        XCTAssertEqual(bench.exitRates, [0.71, 0.29])
        XCTAssertClose(try XCTUnwrap(bench.expectedLatencyMs), 2 + 0.29 * 4.5)
        XCTAssertThrowsError(try CascadeBenchmark(spec: XCTUnwrap(m.cascade), stageStats: [small]))
        XCTAssertEqual(bench.stageSummary(0), "2.00 ms · answers 71%")
        XCTAssertEqual(bench.stageSummary(1), "4.50 ms · answers 29%")

        let device = DeviceCatalog.device(identifier: "iPhone13,2", isSimulator: false, os: "iOS 18.1")
        let report = DeviceReport(manifest: m, device: device, computeUnits: .all, cascade: bench,
                                  created: Date(timeIntervalSince1970: 1_795_462_800))
        XCTAssertEqual(report.inputSize, [64, 64], "the top level describes the last stage")
        XCTAssertEqual(report.roundsMs, large.roundsMs)
        XCTAssertEqual(report.statsMs, large.stats)

        let o = try XCTUnwrap(JSONSerialization.jsonObject(with: report.encoded()) as? [String: Any])
        XCTAssertTrue(o.keys.contains("cascade"))
        let c = try XCTUnwrap(o["cascade"] as? [String: Any])
        XCTAssertEqual(Set(c.keys), ["exit_rates", "stage_latency_ms", "mean_latency_ms", "threshold", "exit_rates_source"])
        XCTAssertEqual(c["exit_rates"] as? [Double], [0.71, 0.29])
        XCTAssertEqual(c["stage_latency_ms"] as? [Double], [2, 4.5])
        XCTAssertEqual(c["mean_latency_ms"] as? Double, 3.305)
        XCTAssertEqual(c["threshold"] as? Double, 0.83)
        XCTAssertEqual(c["exit_rates_source"] as? String, "threshold_selection")
        XCTAssertEqual(try DeviceReport.decode(from: report.encoded()), report)

        // without exit rates in the manifest there is nothing to put in the report's cascade object
        var spec = try XCTUnwrap(m.cascade)
        spec.thresholdSelection = nil
        let bare = try CascadeBenchmark(spec: spec, stageStats: [small, large])
        XCTAssertNil(bare.reportCascade)
        XCTAssertEqual(bare.stageSummary(1), "4.50 ms")
        XCTAssertNil(DeviceReport(manifest: m, device: device, computeUnits: .all, cascade: bare).cascade)
    }

    func testProgressOverStages() {
        let p = BenchmarkProgress(completed: 10, total: 100, phase: .measuring, round: 3)
        let c = p.combined(stage: 1, of: 2)
        XCTAssertEqual(c.completed, 110)
        XCTAssertEqual(c.total, 200)
        XCTAssertEqual(c.round, 3)
        XCTAssertClose(c.fraction, 0.55)
    }
}
