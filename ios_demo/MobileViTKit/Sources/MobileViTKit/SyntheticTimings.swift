import Foundation

/// SplitMix64: a tiny deterministic generator, so that synthetic timings are reproducible from a
/// seed on every platform (unlike `SystemRandomNumberGenerator`).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    public mutating func unit() -> Double { Double(next() >> 11) / Double(UInt64(1) << 53) }
}

/// Fake per-inference timings for tests and the cross-language contract check — NOT measurements.
/// Reports built from them are labelled as synthetic by `mvkit-report`.
public enum SyntheticTimings {
    public static let deviceName = "synthetic (mvkit-report --synthetic)"
    public static let deviceIdentifier = "synthetic"

    /// `method.rounds` x `method.inferencesPerRound` timings around `baseMs`, with jitter and a few
    /// slow outliers (what the ModelBench trimming is for). Same seed, same numbers.
    public static func generate(method: BenchmarkMethod, seed: UInt64, baseMs: Double = 5.0) -> [[Double]] {
        var rng = SplitMix64(seed: seed)
        return (0..<method.rounds).map { _ in
            (0..<method.inferencesPerRound).map { _ in
                let jitter = (rng.unit() + rng.unit() + rng.unit() - 1.5) * 0.1 * baseMs
                let outlier = rng.unit() < 0.05 ? baseMs * (1 + 2 * rng.unit()) : 0
                return Swift.max(0.01, baseMs + jitter + outlier)
            }
        }
    }
}
