import Foundation
import XCTest
@testable import MobileViTKit

final class BenchmarkTests: XCTestCase {
    func testModelBenchDefaults() {
        let m = BenchmarkMethod.modelBench
        XCTAssertEqual([m.warmup, m.rounds, m.inferencesPerRound, m.trimLow, m.trimHigh], [10, 20, 50, 10, 10])
        XCTAssertEqual(m.name, "modelbench")
        XCTAssertEqual(m.totalInferences, 1010)
    }

    func testTrimmedMeanDropsExtremes() throws {
        // 1..10 plus two wild outliers; dropping 2 low (1, 2) and 2 high (500, 1000)
        let v: [Double] = [1000, 3, 1, 4, 5, 500, 2, 6, 7, 8, 9, 10]
        XCTAssertClose(try BenchmarkStats.trimmedMean(v, trimLow: 2, trimHigh: 2), (3.0 + 4 + 5 + 6 + 7 + 8 + 9 + 10) / 8)
        // asymmetric trimming: 1 low (1), 3 high (10, 500, 1000)
        XCTAssertClose(try BenchmarkStats.trimmedMean(v, trimLow: 1, trimHigh: 3), (2.0 + 3 + 4 + 5 + 6 + 7 + 8 + 9) / 8)
        XCTAssertThrowsError(try BenchmarkStats.trimmedMean([1, 2], trimLow: 1, trimHigh: 1))
        XCTAssertThrowsError(try BenchmarkStats.trimmedMean([1, .infinity, 3], trimLow: 0, trimHigh: 0))
    }

    /// Reference values from numpy: median, mean, percentile(90) (linear), std (ddof=0).
    func testSummaryStatsMatchNumpy() {
        let s = SummaryStats(of: [7.1, 7.0, 6.9, 7.4, 7.3, 7.05, 7.2])
        XCTAssertClose(s.median, 7.1)
        XCTAssertClose(s.mean, 7.135714285714285)
        XCTAssertClose(s.p90, 7.34)
        XCTAssertClose(s.std, 0.16193977212506622)
        XCTAssertEqual(s.min, 6.9)
        XCTAssertEqual(s.max, 7.4)
        let e = SummaryStats(of: [3, 1, 2, 10])
        XCTAssertClose(e.median, 2.5)
        XCTAssertClose(e.p90, 7.9)
        XCTAssertClose(e.std, 3.5355339059327378)
    }

    func testBenchmarkStatsPerRound() throws {
        let method = BenchmarkMethod(warmup: 0, rounds: 3, inferencesPerRound: 5, trimLow: 1, trimHigh: 1)
        let timings: [[Double]] = [
            [1, 2, 3, 4, 100],  // kept 2, 3, 4 -> 3
            [0.5, 5, 5, 5, 5],  // kept 5, 5, 5 -> 5
            [4, 4, 4, 4, 4],    // -> 4
        ]
        let b = try BenchmarkStats(method: method, timingsMs: timings)
        XCTAssertEqual(b.roundsMs, [3, 5, 4])
        XCTAssertEqual(b.stats.median, 4)
        XCTAssertEqual(b.stats.min, 3)
        XCTAssertEqual(b.stats.max, 5)
        XCTAssertClose(b.stats.mean, 4)
        XCTAssertClose(b.stats.p90, 4.8)
        XCTAssertClose(b.stats.std, (2.0 / 3.0).squareRoot(), tol: 1e-12)
    }

    func testBenchmarkStatsRejectsWrongShapes() {
        let method = BenchmarkMethod(warmup: 0, rounds: 2, inferencesPerRound: 3, trimLow: 1, trimHigh: 1)
        XCTAssertThrowsError(try BenchmarkStats(method: method, timingsMs: [[1, 2, 3]])) {
            XCTAssertEqual($0 as? BenchmarkError, .roundCount(got: 1, expected: 2))
        }
        XCTAssertThrowsError(try BenchmarkStats(method: method, timingsMs: [[1, 2, 3], [1, 2]])) {
            XCTAssertEqual($0 as? BenchmarkError, .roundShape(round: 1, got: 2, expected: 3))
        }
        let over = BenchmarkMethod(warmup: 0, rounds: 1, inferencesPerRound: 4, trimLow: 2, trimHigh: 2)
        XCTAssertThrowsError(try BenchmarkStats(method: over, timingsMs: [[1, 2, 3, 4]]))
    }

    func testLoopRunsWarmupThenTimedRounds() throws {
        let method = BenchmarkMethod(warmup: 3, rounds: 2, inferencesPerRound: 4, trimLow: 1, trimHigh: 1)
        var calls = 0
        // Fake clock: each inference takes (call number) ms, so warm-up calls must not be timed.
        var now: UInt64 = 0
        var reported: [BenchmarkProgress] = []
        let timings = try BenchmarkLoop.run(
            method: method,
            clock: { now },
            progress: { reported.append($0) },
            body: {
                calls += 1
                now += UInt64(calls) * 1_000_000
            })
        XCTAssertEqual(calls, 3 + 2 * 4)
        XCTAssertEqual(timings, [[4, 5, 6, 7], [8, 9, 10, 11]])
        XCTAssertEqual(reported.first?.phase, .warmup)
        XCTAssertEqual(reported.last?.completed, 11)
        XCTAssertEqual(reported.last?.fraction, 1)
    }

    func testLoopStopsWhenCancelled() {
        var calls = 0
        XCTAssertThrowsError(try BenchmarkLoop.run(method: .modelBench, isCancelled: { calls >= 25 }, body: { calls += 1 })) {
            XCTAssertEqual($0 as? BenchmarkError, .cancelled)
        }
        XCTAssertEqual(calls, 25)
    }

    func testRealClockMeasuresSomething() throws {
        let method = BenchmarkMethod(warmup: 1, rounds: 2, inferencesPerRound: 3, trimLow: 0, trimHigh: 0)
        let t = try BenchmarkLoop.run(method: method) { usleep(2000) }
        XCTAssertEqual(t.count, 2)
        XCTAssertTrue(t.joined().allSatisfy { $0 >= 1.9 && $0 < 1000 }, "\(t)")
    }

    func testSyntheticTimingsAreDeterministic() throws {
        let m = BenchmarkMethod.modelBench
        let a = SyntheticTimings.generate(method: m, seed: 7)
        XCTAssertEqual(a, SyntheticTimings.generate(method: m, seed: 7))
        XCTAssertNotEqual(a, SyntheticTimings.generate(method: m, seed: 8))
        XCTAssertEqual(a.count, 20)
        XCTAssertTrue(a.allSatisfy { $0.count == 50 })
        let stats = try BenchmarkStats(method: m, timingsMs: a)
        // trimming removes the slow outliers: the rounds stay near the 5 ms base
        XCTAssertTrue(stats.roundsMs.allSatisfy { abs($0 - 5) < 0.5 }, "\(stats.roundsMs)")
        XCTAssertGreaterThan(a.joined().max()!, 7, "outliers exist before trimming")
    }
}
