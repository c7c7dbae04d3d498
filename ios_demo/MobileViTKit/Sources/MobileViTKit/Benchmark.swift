import Dispatch
import Foundation

/// How latency is measured: Apple's ModelBench method — warm-up inferences, then `rounds` rounds of
/// `inferencesPerRound` inferences; in each round the `trimLow` fastest and `trimHigh` slowest are
/// dropped and the rest averaged. Encoded as the device report's `method` object.
public struct BenchmarkMethod: Codable, Equatable, Sendable {
    public var name: String
    public var warmup: Int
    public var rounds: Int
    public var inferencesPerRound: Int
    public var trimLow: Int
    public var trimHigh: Int

    public init(name: String = "modelbench", warmup: Int, rounds: Int, inferencesPerRound: Int, trimLow: Int, trimHigh: Int) {
        self.name = name
        self.warmup = warmup
        self.rounds = rounds
        self.inferencesPerRound = inferencesPerRound
        self.trimLow = trimLow
        self.trimHigh = trimHigh
    }

    /// ModelBench defaults: 10 warm-up, 20 rounds x 50 inferences, drop the 10 lowest and 10 highest.
    public static let modelBench = BenchmarkMethod(warmup: 10, rounds: 20, inferencesPerRound: 50, trimLow: 10, trimHigh: 10)

    public var totalInferences: Int { warmup + rounds * inferencesPerRound }

    public func validate() throws {
        guard warmup >= 0, rounds >= 1, inferencesPerRound >= 1, trimLow >= 0, trimHigh >= 0 else {
            throw BenchmarkError.badMethod("warmup, trims >= 0 and rounds, inferences_per_round >= 1 required")
        }
        guard trimLow + trimHigh < inferencesPerRound else {
            throw BenchmarkError.badMethod("trimming \(trimLow) + \(trimHigh) leaves nothing of \(inferencesPerRound) inferences per round")
        }
    }

    enum CodingKeys: String, CodingKey {
        case name, warmup, rounds
        case inferencesPerRound = "inferences_per_round"
        case trimLow = "trim_low"
        case trimHigh = "trim_high"
    }
}

public enum BenchmarkError: Error, Equatable, CustomStringConvertible, LocalizedError {
    case badMethod(String)
    case roundShape(round: Int, got: Int, expected: Int)
    case roundCount(got: Int, expected: Int)
    case nonFinite
    case cancelled

    public var description: String {
        switch self {
        case .badMethod(let why): return "bad benchmark method: \(why)"
        case .roundShape(let r, let got, let expected): return "round \(r) has \(got) timings, expected \(expected)"
        case .roundCount(let got, let expected): return "got \(got) rounds, expected \(expected)"
        case .nonFinite: return "timings must be finite and non-negative"
        case .cancelled: return "benchmark cancelled"
        }
    }

    public var errorDescription: String? { description }
}

/// Summary statistics (ms) as in the report's `stats_ms`.
public struct SummaryStats: Codable, Equatable, Sendable {
    public var median: Double
    public var mean: Double
    public var p90: Double
    public var min: Double
    public var max: Double
    /// Population standard deviation (numpy's default, ddof = 0).
    public var std: Double

    public init(median: Double, mean: Double, p90: Double, min: Double, max: Double, std: Double) {
        self.median = median
        self.mean = mean
        self.p90 = p90
        self.min = min
        self.max = max
        self.std = std
    }

    /// Statistics of a non-empty sample; percentiles interpolate linearly (numpy's default).
    public init(of values: [Double]) {
        precondition(!values.isEmpty, "statistics of an empty sample")
        let s = values.sorted()
        let n = Double(s.count)
        let mean = s.reduce(0, +) / n
        let variance = s.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / n
        self.init(
            median: SummaryStats.percentile(sorted: s, 50),
            mean: mean,
            p90: SummaryStats.percentile(sorted: s, 90),
            min: s[0],
            max: s[s.count - 1],
            std: variance.squareRoot()
        )
    }

    /// Linear-interpolation percentile of sorted values (numpy.percentile, method="linear").
    public static func percentile(sorted s: [Double], _ q: Double) -> Double {
        precondition(!s.isEmpty && q >= 0 && q <= 100)
        let pos = q / 100 * Double(s.count - 1)
        let lo = Int(pos.rounded(.down)), hi = Int(pos.rounded(.up))
        return s[lo] + (s[hi] - s[lo]) * (pos - Double(lo))
    }
}

/// ModelBench statistics from raw per-inference timings.
public struct BenchmarkStats: Equatable, Sendable {
    /// Digits kept in the reported per-round milliseconds (0.1 microsecond).
    public static let reportedDigits = 4

    public var method: BenchmarkMethod
    /// Per round: mean of the kept (trimmed) inferences, ms — the report's `rounds_ms`.
    public var roundsMs: [Double]
    /// Over `roundsMs` — the report's `stats_ms`.
    public var stats: SummaryStats

    /// - Parameter timingsMs: `method.rounds` arrays of `method.inferencesPerRound` timings (ms),
    ///   warm-up excluded.
    public init(method: BenchmarkMethod, timingsMs: [[Double]]) throws {
        try method.validate()
        guard timingsMs.count == method.rounds else {
            throw BenchmarkError.roundCount(got: timingsMs.count, expected: method.rounds)
        }
        var rounds: [Double] = []
        for (r, values) in timingsMs.enumerated() {
            guard values.count == method.inferencesPerRound else {
                throw BenchmarkError.roundShape(round: r, got: values.count, expected: method.inferencesPerRound)
            }
            rounds.append(try BenchmarkStats.trimmedMean(values, trimLow: method.trimLow, trimHigh: method.trimHigh))
        }
        self.method = method
        // rounds_ms is rounded for the report; stats_ms is then computed from exactly those numbers
        // (not rounded itself), so a reader that recomputes it from rounds_ms gets the same values.
        roundsMs = rounds.map { roundTo($0, BenchmarkStats.reportedDigits) }
        stats = SummaryStats(of: roundsMs)
    }

    /// Mean after dropping the `trimLow` smallest and `trimHigh` largest values.
    public static func trimmedMean(_ values: [Double], trimLow: Int, trimHigh: Int) throws -> Double {
        guard values.allSatisfy({ $0.isFinite && $0 >= 0 }) else { throw BenchmarkError.nonFinite }
        guard trimLow >= 0, trimHigh >= 0, trimLow + trimHigh < values.count else {
            throw BenchmarkError.badMethod("cannot drop \(trimLow) + \(trimHigh) of \(values.count) values")
        }
        let kept = values.sorted()[trimLow..<(values.count - trimHigh)]
        return kept.reduce(0, +) / Double(kept.count)
    }
}

/// Progress of a running benchmark, for the UI.
public struct BenchmarkProgress: Equatable, Sendable {
    public var completed: Int
    public var total: Int
    public var phase: Phase
    public var round: Int

    public enum Phase: String, Sendable {
        case warmup
        case measuring
    }

    public init(completed: Int, total: Int, phase: Phase, round: Int) {
        self.completed = completed
        self.total = total
        self.phase = phase
        self.round = round
    }

    public var fraction: Double { total == 0 ? 1 : Double(completed) / Double(total) }
}

/// Monotonic time in nanoseconds (mach_absolute_time on Apple platforms, CLOCK_MONOTONIC on Linux).
public enum Stopwatch {
    public static func nowNanoseconds() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    /// Wall time of `body` in milliseconds.
    public static func measureMs(clock: () -> UInt64 = nowNanoseconds, _ body: () throws -> Void) rethrows -> Double {
        let t0 = clock()
        try body()
        let t1 = clock()
        return Double(t1 &- t0) / 1_000_000
    }
}

/// Runs the ModelBench loop around an inference closure; the platform-free half of the app's
/// benchmark (the Core ML half only supplies `body`).
public enum BenchmarkLoop {
    /// - Returns: raw timings (ms), `method.rounds` arrays of `method.inferencesPerRound`.
    public static func run(
        method: BenchmarkMethod,
        clock: () -> UInt64 = Stopwatch.nowNanoseconds,
        isCancelled: () -> Bool = { false },
        progress: ((BenchmarkProgress) -> Void)? = nil,
        body: () throws -> Void
    ) throws -> [[Double]] {
        try method.validate()
        let total = method.totalInferences
        var done = 0
        let every = Swift.max(1, method.inferencesPerRound / 5)
        for _ in 0..<method.warmup {
            if isCancelled() { throw BenchmarkError.cancelled }
            try body()
            done += 1
        }
        progress?(BenchmarkProgress(completed: done, total: total, phase: .warmup, round: 0))
        var timings: [[Double]] = []
        timings.reserveCapacity(method.rounds)
        for r in 0..<method.rounds {
            var round: [Double] = []
            round.reserveCapacity(method.inferencesPerRound)
            for i in 0..<method.inferencesPerRound {
                if isCancelled() { throw BenchmarkError.cancelled }
                round.append(try Stopwatch.measureMs(clock: clock, body))
                done += 1
                if (i + 1) % every == 0 {
                    progress?(BenchmarkProgress(completed: done, total: total, phase: .measuring, round: r + 1))
                }
            }
            timings.append(round)
        }
        return timings
    }
}

/// `x` rounded to `digits` decimal places.
func roundTo(_ x: Double, _ digits: Int) -> Double {
    let p = Foundation.pow(10.0, Double(digits))
    return (x * p).rounded() / p
}
