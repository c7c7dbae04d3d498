import Foundation

/// A coarse-to-fine cascade (CF-ViT as static graphs): the manifest's optional `cascade` section,
/// docs/contracts.md §1.
///
/// Stage 1 runs on a small input; when the largest probability of its output reaches the threshold
/// its answer is final, otherwise the next stage runs on the same image prepared at its own, larger
/// size, and so on; the last stage always answers. ExecuTorch: one `.pte` with one method per stage;
/// Core ML: one multi-function `.mlpackage` with one function per stage (iOS 18+). `stages[i].name`
/// is the method / function name. The manifest's `input.shape` is the last stage's.
public struct CascadeSpec: Codable, Equatable, Sendable {
    public struct Stage: Codable, Equatable, Sendable {
        /// ExecuTorch method name / Core ML function name.
        public var name: String
        /// H, W.
        public var inputSize: [Int]

        public init(name: String, inputSize: [Int]) {
            self.name = name
            self.inputSize = inputSize
        }

        /// Valid after `CascadeSpec.validate()`.
        public var height: Int { inputSize[0] }
        public var width: Int { inputSize[1] }

        enum CodingKeys: String, CodingKey {
            case name
            case inputSize = "input_size"
        }
    }

    /// When a stage's answer is final. Unknown kinds fail to decode (a reader must not guess a rule).
    public enum ExitRule: Codable, Equatable, Sendable {
        /// Exit when max(softmax(logits)) (or max of the probabilities) >= threshold.
        case maxProbability(threshold: Double)

        public static let knownKinds = ["max_probability"]

        public var kind: String {
            switch self {
            case .maxProbability: return "max_probability"
            }
        }

        public var threshold: Double {
            switch self {
            case .maxProbability(let t): return t
            }
        }

        enum CodingKeys: String, CodingKey {
            case kind, threshold
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            let kind = try c.decode(String.self, forKey: .kind)
            switch kind {
            case "max_probability":
                self = .maxProbability(threshold: try c.decode(Double.self, forKey: .threshold))
            default:
                throw DecodingError.dataCorruptedError(
                    forKey: .kind, in: c,
                    debugDescription: "unknown cascade exit rule kind \"\(kind)\" (this reader knows: \(ExitRule.knownKinds.joined(separator: ", ")))")
            }
        }

        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(kind, forKey: .kind)
            try c.encode(threshold, forKey: .threshold)
        }
    }

    /// How the exporter chose the threshold (informational; every field optional).
    public struct ThresholdSelection: Codable, Equatable, Sendable {
        public var data: String?
        public var images: Int?
        /// Allowed top-1 drop of the cascade against the last stage alone, in points.
        public var maxDropPoints: Double?
        public var lastStageTop1: Double?
        public var cascadeTop1: Double?
        /// Fraction of the selection images answered by each stage (sums to 1).
        public var exitRates: [Double]?

        public init(data: String? = nil, images: Int? = nil, maxDropPoints: Double? = nil, lastStageTop1: Double? = nil,
                    cascadeTop1: Double? = nil, exitRates: [Double]? = nil) {
            self.data = data
            self.images = images
            self.maxDropPoints = maxDropPoints
            self.lastStageTop1 = lastStageTop1
            self.cascadeTop1 = cascadeTop1
            self.exitRates = exitRates
        }

        enum CodingKeys: String, CodingKey {
            case data, images
            case maxDropPoints = "max_drop_points"
            case lastStageTop1 = "last_stage_top1"
            case cascadeTop1 = "cascade_top1"
            case exitRates = "exit_rates"
        }
    }

    public var stages: [Stage]
    public var exitRule: ExitRule
    public var thresholdSelection: ThresholdSelection?

    public init(stages: [Stage], exitRule: ExitRule, thresholdSelection: ThresholdSelection? = nil) {
        self.stages = stages
        self.exitRule = exitRule
        self.thresholdSelection = thresholdSelection
    }

    enum CodingKeys: String, CodingKey {
        case stages
        case exitRule = "exit_rule"
        case thresholdSelection = "threshold_selection"
    }

    public var threshold: Double { exitRule.threshold }
    public var lastStageIndex: Int { stages.count - 1 }

    /// Structural checks; throws the first problem found.
    /// - Parameter inputSize: the manifest's `input.shape` H, W, which must be the last stage's size.
    public func validate(inputSize: [Int]? = nil) throws {
        guard stages.count >= 2 else { throw CascadeError.tooFewStages(stages.count) }
        var names = Set<String>()
        for (i, s) in stages.enumerated() {
            guard !s.name.isEmpty else { throw CascadeError.badStage(index: i, "name is empty") }
            guard names.insert(s.name).inserted else { throw CascadeError.badStage(index: i, "name \"\(s.name)\" is used twice") }
            guard s.inputSize.count == 2, s.inputSize.allSatisfy({ $0 > 0 }) else {
                throw CascadeError.badStage(index: i, "input_size must be [H, W] with positive values, got \(s.inputSize)")
            }
            if i > 0 {
                let p = stages[i - 1]
                guard s.height > p.height, s.width > p.width else {
                    throw CascadeError.sizesNotIncreasing(index: i, previous: p.inputSize, got: s.inputSize)
                }
            }
        }
        let t = threshold
        guard t.isFinite, t >= 0, t <= 1 else { throw CascadeError.thresholdOutOfRange(t) }
        if let inputSize, let last = stages.last, last.inputSize != inputSize {
            throw CascadeError.lastStageMismatch(stage: last.inputSize, input: inputSize)
        }
        if let rates = thresholdSelection?.exitRates {
            guard rates.count == stages.count else {
                throw CascadeError.inconsistent("threshold_selection.exit_rates has \(rates.count) values for \(stages.count) stages")
            }
            guard rates.allSatisfy({ $0.isFinite && $0 >= 0 && $0 <= 1 }), abs(rates.reduce(0, +) - 1) <= 0.01 else {
                throw CascadeError.inconsistent("threshold_selection.exit_rates must be fractions summing to 1, got \(rates)")
            }
        }
    }

    /// Whether stage `stageIndex`'s answer is final. The last stage always answers; an earlier one
    /// when its largest probability is at or above the threshold (NaN never exits).
    public func shouldExit(stageIndex: Int, probabilities: [Double]) -> Bool {
        if stageIndex >= lastStageIndex { return true }
        guard let m = probabilities.max(), m.isFinite else { return false }
        switch exitRule {
        case .maxProbability(let t): return m >= t
        }
    }

    /// The manifest's preprocessing (crop, normalisation) at stage `index`'s input size.
    public func preprocessing(stage index: Int, base: Preprocessing) -> Preprocessing {
        var p = base
        p.height = stages[index].height
        p.width = stages[index].width
        return p
    }

    /// Mean cost per image when stage i costs `stageLatencyMs[i]` and an image answered by stage k
    /// ran stages 1...k (the Python `CascadeOutcome.cost`).
    public static func expectedLatencyMs(stageLatencyMs: [Double], exitRates: [Double]) -> Double {
        precondition(stageLatencyMs.count == exitRates.count, "one latency and one exit rate per stage")
        var reach = 1.0, total = 0.0
        for (latency, rate) in zip(stageLatencyMs, exitRates) {
            total += reach * latency
            reach -= rate
        }
        return total
    }

    /// E.g. "stage 1 of 2 (forward_a, H×W)".
    public func stageDescription(_ index: Int) -> String {
        CascadeSpec.describe(index: index, count: stages.count, name: stages[index].name, inputSize: stages[index].inputSize)
    }

    static func describe(index: Int, count: Int, name: String, inputSize: [Int]) -> String {
        "stage \(index + 1) of \(count) (\(name), \(inputSize.map(String.init).joined(separator: "×")))"
    }

    /// One line for the UI, e.g. "2 stages: forward_a H×W → forward_b H×W, exit at p ≥ 0.83".
    public var summary: String {
        let chain = stages.map { "\($0.name) \($0.height)×\($0.width)" }.joined(separator: " → ")
        return "\(stages.count) stages: \(chain), exit at p ≥ \(String(format: "%.2f", threshold))"
    }
}

public enum CascadeError: Error, Equatable, CustomStringConvertible, LocalizedError {
    case tooFewStages(Int)
    case badStage(index: Int, String)
    case sizesNotIncreasing(index: Int, previous: [Int], got: [Int])
    case thresholdOutOfRange(Double)
    case lastStageMismatch(stage: [Int], input: [Int])
    case inconsistent(String)
    case notACascade
    case stageOutput(stage: String, String)
    case noResults
    case unreachedStage(String)
    case unsupportedOS(String)

    public var description: String {
        switch self {
        case .tooFewStages(let n): return "a cascade needs at least 2 stages, got \(n)"
        case .badStage(let i, let why): return "stage \(i + 1): \(why)"
        case .sizesNotIncreasing(let i, let p, let g):
            return "stage input sizes must strictly increase in H and W: stage \(i + 1) is \(g) after \(p)"
        case .thresholdOutOfRange(let t): return "exit_rule.threshold must be in [0, 1], got \(t)"
        case .lastStageMismatch(let s, let i): return "the last stage's input_size \(s) differs from input.shape H, W \(i)"
        case .inconsistent(let why): return why
        case .notACascade: return "the manifest has no cascade section"
        case .stageOutput(let s, let why): return "stage \(s): \(why)"
        case .noResults: return "no cascade results to summarise"
        case .unreachedStage(let s): return "no image reached stage \(s), so its latency is unknown"
        case .unsupportedOS(let why): return why
        }
    }

    public var errorDescription: String? { description }
}

extension Manifest {
    /// This manifest as one stage of its cascade sees it: `input.shape` at the stage's size and no
    /// `cascade` section (what a single-graph classifier of that stage is checked against).
    public func stageManifest(_ index: Int) -> Manifest {
        var m = self
        if let stage = cascade?.stages[index] {
            m.input.shape = [input.shape[0], input.shape[1], stage.height, stage.width]
        }
        m.cascade = nil
        return m
    }
}

// MARK: - Running a cascade

/// What the driver hands to the stage closures.
public struct CascadeStep: Sendable {
    public var index: Int
    public var stage: CascadeSpec.Stage
    /// The manifest's preprocessing at this stage's input size.
    public var preprocessing: Preprocessing
    public var isLast: Bool
}

/// One stage that ran for an image.
public struct CascadeStageRun: Equatable, Sendable, Identifiable {
    public var index: Int
    public var name: String
    /// H, W.
    public var inputSize: [Int]
    public var maxProbability: Double
    /// Preparing this stage's input (crop, resize, conversion), ms.
    public var preprocessingMs: Double
    /// Running this stage's graph, ms — the stage's latency.
    public var inferenceMs: Double

    public var id: Int { index }

    public init(index: Int, name: String, inputSize: [Int], maxProbability: Double, preprocessingMs: Double, inferenceMs: Double) {
        self.index = index
        self.name = name
        self.inputSize = inputSize
        self.maxProbability = maxProbability
        self.preprocessingMs = preprocessingMs
        self.inferenceMs = inferenceMs
    }
}

/// The outcome of one image through the cascade.
public struct CascadeResult: Equatable, Sendable {
    /// Index of the stage whose answer is final (the last of `runs`).
    public var answeringStage: Int
    public var stageCount: Int
    /// Top-k of the answering stage.
    public var predictions: [Prediction]
    /// Stages 0...answeringStage, in order.
    public var runs: [CascadeStageRun]

    public init(answeringStage: Int, stageCount: Int, predictions: [Prediction], runs: [CascadeStageRun]) {
        self.answeringStage = answeringStage
        self.stageCount = stageCount
        self.predictions = predictions
        self.runs = runs
    }

    public var answeringRun: CascadeStageRun { runs[runs.count - 1] }
    /// Per stage that ran, its inference latency (ms).
    public var stageLatencyMs: [Double] { runs.map(\.inferenceMs) }
    /// Model time for this image: the sum over the stages that ran.
    public var inferenceMs: Double { runs.reduce(0) { $0 + $1.inferenceMs } }
    public var preprocessingMs: Double { runs.reduce(0) { $0 + $1.preprocessingMs } }

    /// E.g. "stage 1 of 2 (forward_a, H×W)".
    public var answerDescription: String {
        let r = answeringRun
        return CascadeSpec.describe(index: r.index, count: stageCount, name: r.name, inputSize: r.inputSize)
    }
}

/// Runs one image through the cascade.
/// - Parameters:
///   - preprocessing: the manifest's (`manifest.preprocessing`); each stage gets it at its own size.
///   - outputKind: whether `runStage` returns logits (softmax is applied) or probabilities (renormalised).
///   - clock: nanoseconds, injectable for tests.
///   - prepare: the stage's input from the image (which the closure captures).
///   - runStage: the stage's raw scores, ordered like `labels`.
public func runCascade<Input>(
    _ spec: CascadeSpec,
    preprocessing: Preprocessing,
    outputKind: OutputKind,
    labels: [String],
    topK: Int = 5,
    clock: () -> UInt64 = Stopwatch.nowNanoseconds,
    prepare: (CascadeStep) throws -> Input,
    runStage: (CascadeStep, Input) throws -> [Double]
) throws -> CascadeResult {
    try spec.validate()
    var runs: [CascadeStageRun] = []
    for (i, stage) in spec.stages.enumerated() {
        let step = CascadeStep(index: i, stage: stage, preprocessing: spec.preprocessing(stage: i, base: preprocessing),
                               isLast: i == spec.lastStageIndex)
        let t0 = clock()
        let input = try prepare(step)
        let t1 = clock()
        let scores = try runStage(step, input)
        let t2 = clock()
        guard scores.count == labels.count else {
            throw CascadeError.stageOutput(stage: stage.name, "returned \(scores.count) scores for \(labels.count) labels")
        }
        let p = try Classification.probabilities(scores, kind: outputKind)
        runs.append(CascadeStageRun(index: i, name: stage.name, inputSize: stage.inputSize, maxProbability: p.max() ?? 0,
                                    preprocessingMs: Double(t1 &- t0) / 1_000_000, inferenceMs: Double(t2 &- t1) / 1_000_000))
        if spec.shouldExit(stageIndex: i, probabilities: p) {
            let predictions = Classification.topK(p, k: topK).map { Prediction(index: $0, label: labels[$0], probability: p[$0]) }
            return CascadeResult(answeringStage: i, stageCount: spec.stages.count, predictions: predictions, runs: runs)
        }
    }
    preconditionFailure("the last stage always answers")
}

extension Manifest {
    /// `runCascade` with this manifest's cascade, preprocessing, output kind and labels.
    public func runCascade<Input>(
        topK: Int = 5,
        clock: () -> UInt64 = Stopwatch.nowNanoseconds,
        prepare: (CascadeStep) throws -> Input,
        runStage: (CascadeStep, Input) throws -> [Double]
    ) throws -> CascadeResult {
        guard let cascade else { throw CascadeError.notACascade }
        return try MobileViTKit.runCascade(cascade, preprocessing: preprocessing, outputKind: outputKind, labels: labels,
                                           topK: topK, clock: clock, prepare: prepare, runStage: runStage)
    }
}

// MARK: - Statistics and the device report

/// Exit rates and latencies over many images' `CascadeResult`s (model time only, ms).
public struct CascadeStats: Equatable, Sendable {
    public var images: Int
    /// Per stage: how many images it answered.
    public var exitCounts: [Int]
    /// Per stage: the fraction of images it answered (sums to 1).
    public var exitRates: [Double]
    /// Per stage: its inference latency over the images that reached it; nil if none did.
    public var stageLatency: [SummaryStats?]
    /// Per image: the summed inference latency of the stages that ran.
    public var latency: SummaryStats

    public init(results: [CascadeResult], stageCount: Int) throws {
        guard !results.isEmpty else { throw CascadeError.noResults }
        var counts = [Int](repeating: 0, count: stageCount)
        var perStage = [[Double]](repeating: [], count: stageCount)
        for r in results {
            guard r.stageCount == stageCount, r.answeringStage < stageCount, r.runs.count == r.answeringStage + 1 else {
                throw CascadeError.inconsistent("a result of a \(r.stageCount)-stage cascade among \(stageCount)-stage results")
            }
            counts[r.answeringStage] += 1
            for run in r.runs { perStage[run.index].append(run.inferenceMs) }
        }
        images = results.count
        exitCounts = counts
        exitRates = counts.map { Double($0) / Double(results.count) }
        stageLatency = perStage.map { $0.isEmpty ? nil : SummaryStats(of: $0) }
        latency = SummaryStats(of: results.map(\.inferenceMs))
    }

    /// Per stage: mean inference latency (ms), nil for a stage no image reached.
    public var stageLatencyMs: [Double?] { stageLatency.map { $0?.mean } }
    /// Mean model time per image (ms).
    public var meanLatencyMs: Double { latency.mean }
}

/// The app's cascade benchmark: ModelBench on every stage alone (synthetic input at its size), the
/// exit rates from the manifest's `threshold_selection`, and the expected time per image from both.
public struct CascadeBenchmark: Equatable, Sendable {
    public var spec: CascadeSpec
    /// One per stage, in order.
    public var stageStats: [BenchmarkStats]

    public init(spec: CascadeSpec, stageStats: [BenchmarkStats]) throws {
        guard stageStats.count == spec.stages.count else {
            throw CascadeError.inconsistent("\(stageStats.count) benchmark results for \(spec.stages.count) stages")
        }
        self.spec = spec
        self.stageStats = stageStats
    }

    /// Per stage: ModelBench mean (of the trimmed round means), ms.
    public var stageLatencyMs: [Double] { stageStats.map(\.stats.mean) }
    /// From the manifest (the threshold-selection images), when it has them.
    public var exitRates: [Double]? {
        guard let r = spec.thresholdSelection?.exitRates, r.count == spec.stages.count else { return nil }
        return r
    }

    public var expectedLatencyMs: Double? {
        exitRates.map { CascadeSpec.expectedLatencyMs(stageLatencyMs: stageLatencyMs, exitRates: $0) }
    }

    /// For the UI, e.g. "2.82 ms · answers 71%" (the exit rate only when known).
    public func stageSummary(_ index: Int) -> String {
        let ms = String(format: "%.2f ms", stageLatencyMs[index])
        guard let rates = exitRates else { return ms }
        return ms + " · answers " + String(format: "%.0f%%", rates[index] * 100)
    }

    /// The report's `cascade` object; nil without exit rates.
    public var reportCascade: DeviceReport.Cascade? {
        guard let rates = exitRates, let mean = expectedLatencyMs else { return nil }
        return DeviceReport.Cascade(exitRates: rates, stageLatencyMs: stageLatencyMs, meanLatencyMs: mean,
                                    threshold: spec.threshold, exitRatesSource: DeviceReport.Cascade.fromThresholdSelection)
    }
}

extension DeviceReport.Cascade {
    public static let fromThresholdSelection = "threshold_selection"
    public static let measured = "measured"

    /// From cascade runs measured on the device; every stage must have been reached.
    public init(stats: CascadeStats, threshold: Double) throws {
        var latencies: [Double] = []
        for (i, l) in stats.stageLatencyMs.enumerated() {
            guard let l else { throw CascadeError.unreachedStage("\(i + 1)") }
            latencies.append(l)
        }
        self.init(exitRates: stats.exitRates, stageLatencyMs: latencies, meanLatencyMs: stats.meanLatencyMs,
                  threshold: threshold, exitRatesSource: DeviceReport.Cascade.measured)
    }
}

extension DeviceReport {
    /// A report for a cascade artifact: the top-level `rounds_ms` / `stats_ms` are the last stage's
    /// alone (the model at the manifest's input size); `cascade` adds the per-stage figures.
    public init(manifest: Manifest, device: Device, computeUnits: ComputeUnits, cascade: CascadeBenchmark, created: Date = Date()) {
        self.init(manifest: manifest, device: device, computeUnits: computeUnits,
                  stats: cascade.stageStats[cascade.stageStats.count - 1], created: created)
        self.cascade = cascade.reportCascade
    }
}

extension BenchmarkProgress {
    /// Progress over a benchmark of `stages` equal runs, this one being run `stage` (0-based).
    public func combined(stage: Int, of stages: Int) -> BenchmarkProgress {
        BenchmarkProgress(completed: stage * total + completed, total: stages * total, phase: phase, round: round)
    }
}
