import Foundation

/// A cascade: the manifest's optional `cascade` section, docs/contracts.md §1. Two kinds (`kind`):
///
/// - `sizes` (coarse-to-fine, CF-ViT as static graphs; the default when `kind` is absent): stage 1
///   runs on a small input; when the largest probability of its output reaches the threshold its
///   answer is final, otherwise the next stage runs on the same image prepared at its own, larger
///   size, and so on. The manifest's `input.shape` is the last stage's, which is the whole model.
/// - `depth` (early exit): stage 1 (e.g. `exit_3`) runs the first blocks of the model on the image and
///   answers from an exit head; otherwise stage 2 (`rest_3`) continues from stage 1's `features`
///   output, passed as-is, through the rest of the model. `whole_model` names the whole model alone
///   (a function of its own, e.g. `forward`): the reference the cascade is compared with.
///
/// The exit rule is the same for both: an earlier stage answers when its max probability reaches the
/// threshold; the last stage always answers. ExecuTorch: one `.pte` with one method per stage;
/// Core ML: one multi-function `.mlpackage` with one function per stage (iOS 18+). `stages[i].name`
/// is the method / function name.
public struct CascadeSpec: Codable, Equatable, Sendable {
    /// `sizes` or `depth`. Unknown kinds fail to decode (a reader must not guess how stages connect).
    public enum Kind: String, Codable, Equatable, Sendable, CaseIterable {
        case sizes
        case depth
    }

    public struct Stage: Codable, Equatable, Sendable {
        public static let imageInput = "image"
        public static let featuresInput = "features"
        public static let knownInputs = [imageInput, featuresInput]

        /// ExecuTorch method name / Core ML function name.
        public var name: String
        /// `image` (the photo prepared at `inputSize`; the default) or `features` (the `features` output
        /// of stage `featuresFrom`, as it returned it; depth cascades only).
        public var input: String
        /// H, W of the image the stage answers for. A features stage without one in the manifest gets
        /// its source stage's (the image its features were computed from).
        public var inputSize: [Int]
        /// Features stages: the stage whose `features` output this one takes.
        public var featuresFrom: String?
        /// Features stages: N, C, H, W of those features.
        public var featuresShape: [Int]?
        /// Informational, e.g. `["logits", "features"]`.
        public var outputs: [String]?

        public init(name: String, inputSize: [Int], input: String = Stage.imageInput, featuresFrom: String? = nil,
                    featuresShape: [Int]? = nil, outputs: [String]? = nil) {
            self.name = name
            self.input = input
            self.inputSize = inputSize
            self.featuresFrom = featuresFrom
            self.featuresShape = featuresShape
            self.outputs = outputs
        }

        public var takesFeatures: Bool { input == Stage.featuresInput }

        /// Valid after `CascadeSpec.validate()`.
        public var height: Int { inputSize[0] }
        public var width: Int { inputSize[1] }

        enum CodingKeys: String, CodingKey {
            case name, input, outputs
            case inputSize = "input_size"
            case featuresFrom = "features_from"
            case featuresShape = "features_shape"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            name = try c.decode(String.self, forKey: .name)
            input = try c.decodeIfPresent(String.self, forKey: .input) ?? Stage.imageInput
            // An image stage must say its size; a features stage may inherit it (CascadeSpec.init(from:)).
            inputSize = input == Stage.featuresInput
                ? try c.decodeIfPresent([Int].self, forKey: .inputSize) ?? []
                : try c.decode([Int].self, forKey: .inputSize)
            featuresFrom = try c.decodeIfPresent(String.self, forKey: .featuresFrom)
            featuresShape = try c.decodeIfPresent([Int].self, forKey: .featuresShape)
            outputs = try c.decodeIfPresent([String].self, forKey: .outputs)
        }
    }

    /// The whole model alone as one function (depth cascades: required; e.g. `forward`).
    public struct WholeModel: Codable, Equatable, Sendable {
        public var name: String
        /// H, W.
        public var inputSize: [Int]?

        public init(name: String, inputSize: [Int]? = nil) {
            self.name = name
            self.inputSize = inputSize
        }

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

    public var kind: Kind
    public var stages: [Stage]
    public var wholeModel: WholeModel?
    public var exitRule: ExitRule
    public var thresholdSelection: ThresholdSelection?

    public init(kind: Kind = .sizes, stages: [Stage], wholeModel: WholeModel? = nil, exitRule: ExitRule,
                thresholdSelection: ThresholdSelection? = nil) {
        self.kind = kind
        self.stages = stages
        self.wholeModel = wholeModel
        self.exitRule = exitRule
        self.thresholdSelection = thresholdSelection
    }

    enum CodingKeys: String, CodingKey {
        case kind, stages
        case wholeModel = "whole_model"
        case exitRule = "exit_rule"
        case thresholdSelection = "threshold_selection"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let rawKind = try c.decodeIfPresent(String.self, forKey: .kind) ?? Kind.sizes.rawValue
        guard let kind = Kind(rawValue: rawKind) else {
            throw DecodingError.dataCorruptedError(
                forKey: .kind, in: c,
                debugDescription: "unknown cascade kind \"\(rawKind)\" (this reader knows: \(Kind.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        self.kind = kind
        var stages = try c.decode([Stage].self, forKey: .stages)
        // A features stage without input_size answers for the image its source stage saw.
        for i in stages.indices where stages[i].takesFeatures && stages[i].inputSize.isEmpty {
            if let source = stages[..<i].first(where: { $0.name == stages[i].featuresFrom }) {
                stages[i].inputSize = source.inputSize
            }
        }
        self.stages = stages
        wholeModel = try c.decodeIfPresent(WholeModel.self, forKey: .wholeModel)
        exitRule = try c.decode(ExitRule.self, forKey: .exitRule)
        thresholdSelection = try c.decodeIfPresent(ThresholdSelection.self, forKey: .thresholdSelection)
    }

    public var threshold: Double { exitRule.threshold }
    public var lastStageIndex: Int { stages.count - 1 }

    /// The function of the whole model alone — the app's single-model classifier and the benchmark's
    /// reference: `whole_model.name`, else (a size cascade) the last stage.
    public var wholeModelName: String { wholeModel?.name ?? stages[lastStageIndex].name }
    /// Whether the whole model is a function of its own rather than one of the stages (depth cascades).
    public var wholeModelIsSeparate: Bool { !stages.contains { $0.name == wholeModelName } }
    /// How many functions the benchmark measures alone: every stage, plus a separate whole model.
    public var benchmarkCount: Int { stages.count + (wholeModelIsSeparate ? 1 : 0) }

    /// Structural checks; throws the first problem found.
    /// - Parameter inputSize: the manifest's `input.shape` H, W, which must be the last stage's size
    ///   (and `whole_model.input_size`, when given).
    public func validate(inputSize: [Int]? = nil) throws {
        guard stages.count >= 2 else { throw CascadeError.tooFewStages(stages.count) }
        var names = Set<String>()
        for (i, s) in stages.enumerated() {
            guard !s.name.isEmpty else { throw CascadeError.badStage(index: i, "name is empty") }
            guard names.insert(s.name).inserted else { throw CascadeError.badStage(index: i, "name \"\(s.name)\" is used twice") }
            guard Stage.knownInputs.contains(s.input) else {
                throw CascadeError.badStage(index: i, "input must be \"image\" or \"features\", got \"\(s.input)\"")
            }
            switch kind {
            case .sizes:
                guard !s.takesFeatures else {
                    throw CascadeError.badStage(index: i, "a size cascade's stages take input \"image\", got \"\(s.input)\" (only a depth cascade passes features)")
                }
            case .depth where i == 0:
                guard !s.takesFeatures else {
                    throw CascadeError.badStage(index: i, "the first stage of a depth cascade takes input \"image\", got \"\(s.input)\"")
                }
            case .depth:
                let p = stages[i - 1]
                guard s.takesFeatures else {
                    throw CascadeError.badStage(index: i, "a later stage of a depth cascade takes input \"features\" (the previous stage's features output), got \"\(s.input)\"")
                }
                guard s.featuresFrom == p.name else {
                    throw CascadeError.badStage(index: i, "features_from must be the previous stage's name \"\(p.name)\", got \(s.featuresFrom.map { "\"\($0)\"" } ?? "none")")
                }
                if let shape = s.featuresShape, shape.count != 4 || !shape.allSatisfy({ $0 > 0 }) {
                    throw CascadeError.badStage(index: i, "features_shape must be [N, C, H, W] with positive values, got \(shape)")
                }
            }
            guard s.inputSize.count == 2, s.inputSize.allSatisfy({ $0 > 0 }) else {
                throw CascadeError.badStage(index: i, "input_size must be [H, W] with positive values, got \(s.inputSize)")
            }
            if i > 0 {
                let p = stages[i - 1]
                switch kind {
                case .sizes:
                    guard s.height > p.height, s.width > p.width else {
                        throw CascadeError.sizesNotIncreasing(index: i, previous: p.inputSize, got: s.inputSize)
                    }
                case .depth:
                    guard s.inputSize == stages[0].inputSize else {
                        throw CascadeError.badStage(index: i, "input_size \(s.inputSize) differs from the image size of stage 1 \(stages[0].inputSize)")
                    }
                }
            }
        }
        if kind == .depth, (wholeModel?.name ?? "").isEmpty {
            throw CascadeError.inconsistent("a depth cascade needs whole_model.name (the function of the whole model alone, e.g. \"forward\")")
        }
        if let w = wholeModel {
            guard !w.name.isEmpty else { throw CascadeError.inconsistent("whole_model.name is empty") }
            if let size = w.inputSize, size != (inputSize ?? stages[lastStageIndex].inputSize) {
                throw CascadeError.inconsistent("whole_model.input_size \(size) differs from input.shape H, W \(inputSize ?? stages[lastStageIndex].inputSize)")
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

    /// E.g. "stage 1 of 2 (forward_a, H×W)", or for a features stage "stage 2 of 2 (rest_3, features of exit_3)".
    public func stageDescription(_ index: Int) -> String {
        let s = stages[index]
        return CascadeSpec.describe(index: index, count: stages.count, name: s.name, inputSize: s.inputSize,
                                    featuresFrom: s.takesFeatures ? s.featuresFrom : nil)
    }

    static func describe(index: Int, count: Int, name: String, inputSize: [Int], featuresFrom: String? = nil) -> String {
        let what = featuresFrom.map { "features of \($0)" } ?? inputSize.map(String.init).joined(separator: "×")
        return "stage \(index + 1) of \(count) (\(name), \(what))"
    }

    /// E.g. "whole model alone (forward)".
    public var wholeModelDescription: String { "whole model alone (\(wholeModelName))" }

    /// What the benchmark measures at position `index` of `benchmarkCount`: the stages in order, then a
    /// separate whole model.
    public func benchmarkDescription(_ index: Int) -> String {
        index < stages.count ? stageDescription(index) : wholeModelDescription
    }

    /// One line for the UI, e.g. "2 stages: forward_a H×W → forward_b H×W, exit at p ≥ 0.83", or
    /// "depth cascade, 2 stages: exit_3 64×64 → rest_3 on exit_3's features, exit at p ≥ 0.15, whole model forward".
    public var summary: String {
        let chain = stages.map { s in
            s.takesFeatures ? "\(s.name) on \(s.featuresFrom ?? "?")'s features" : "\(s.name) \(s.height)×\(s.width)"
        }.joined(separator: " → ")
        let exit = "exit at p ≥ \(String(format: "%.2f", threshold))"
        switch kind {
        case .sizes: return "\(stages.count) stages: \(chain), \(exit)"
        case .depth: return "depth cascade, \(stages.count) stages: \(chain), \(exit), whole model \(wholeModelName)"
        }
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

extension CascadeSpec {
    /// The Core ML tensor names of a depth cascade's stage functions (as the exporter writes them): an
    /// image stage outputs `probabilities` ([1, labels], softmax) and `features`; a features stage takes
    /// `features` and outputs `probabilities`.
    public static let probabilitiesName = "probabilities"
    public static let featuresName = "features"
}

extension Manifest {
    /// This manifest as one image stage of its cascade sees it: `input.shape` at the stage's size and no
    /// `cascade` section (what a single-graph classifier of that stage is checked against). A depth
    /// cascade's stages output `probabilities` rather than the whole model's classifier output.
    public func stageManifest(_ index: Int) -> Manifest {
        var m = self
        if let cascade, cascade.stages.indices.contains(index) {
            let stage = cascade.stages[index]
            m.input.shape = [input.shape[0], input.shape[1], stage.height, stage.width]
            if cascade.kind == .depth {
                m.output = Output(name: CascadeSpec.probabilitiesName, shape: [1, labels.count],
                                  kind: OutputKind.probabilities.rawValue)
            }
        }
        m.cascade = nil
        return m
    }

    /// This manifest as the whole model alone sees it (`whole_model.name`, or the last stage): the
    /// manifest's own input and output, no `cascade` section.
    public var wholeModelManifest: Manifest {
        var m = self
        m.cascade = nil
        return m
    }
}

// MARK: - Running a cascade

/// What the driver hands to the stage runner.
public struct CascadeStep: Sendable {
    public var index: Int
    public var stage: CascadeSpec.Stage
    /// The manifest's preprocessing at this stage's input size.
    public var preprocessing: Preprocessing
    public var isLast: Bool
    /// The next stage takes this one's `features` output (depth cascades): return it.
    public var featuresWanted: Bool
}

/// What a stage is given: the photo prepared at its size, or (a depth cascade's later stage) the
/// `features` output of the stage named `from`, exactly as that stage returned it.
public enum CascadeStageInput<Image, Features> {
    case image(Image)
    case features(Features, from: String)
}

/// What a stage returned.
public struct CascadeStageOutput<Features> {
    /// Raw scores ordered like the manifest's labels (logits or probabilities, per its output kind).
    public var scores: [Double]
    /// The stage's `features` output; needed when `CascadeStep.featuresWanted`.
    public var features: Features?

    public init(scores: [Double], features: Features? = nil) {
        self.scores = scores
        self.features = features
    }
}

/// Runs a cascade's stages for one image (which it holds): the Core ML glue in the app, fakes in tests.
public protocol CascadeStageRunner {
    associatedtype Image
    associatedtype Features
    /// An image stage's input from the photo (crop, resize, conversion); timed as preprocessing.
    func prepare(_ step: CascadeStep) throws -> Image
    /// Runs one stage's graph on its input; timed as the stage's latency.
    func run(_ step: CascadeStep, input: CascadeStageInput<Image, Features>) throws -> CascadeStageOutput<Features>
}

/// One stage that ran for an image.
public struct CascadeStageRun: Equatable, Sendable, Identifiable {
    public var index: Int
    public var name: String
    /// H, W.
    public var inputSize: [Int]
    /// A features stage: the stage whose features it was given (nil for an image stage).
    public var featuresFrom: String?
    public var maxProbability: Double
    /// Preparing this stage's input (crop, resize, conversion), ms; 0 for a features stage.
    public var preprocessingMs: Double
    /// Running this stage's graph, ms — the stage's latency.
    public var inferenceMs: Double

    public var id: Int { index }

    public init(index: Int, name: String, inputSize: [Int], featuresFrom: String? = nil, maxProbability: Double,
                preprocessingMs: Double, inferenceMs: Double) {
        self.index = index
        self.name = name
        self.inputSize = inputSize
        self.featuresFrom = featuresFrom
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

    /// E.g. "stage 1 of 2 (forward_a, H×W)" or "stage 2 of 2 (rest_3, features of exit_3)".
    public var answerDescription: String {
        let r = answeringRun
        return CascadeSpec.describe(index: r.index, count: stageCount, name: r.name, inputSize: r.inputSize,
                                    featuresFrom: r.featuresFrom)
    }
}

/// Runs one image through the cascade, as its manifest says: an image stage gets the photo prepared
/// at its own size, a features stage the previous stage's `features` output; an earlier stage answers
/// when its max probability reaches the threshold, the last stage always answers.
/// - Parameters:
///   - preprocessing: the manifest's (`manifest.preprocessing`); each image stage gets it at its own size.
///   - outputKind: whether the stages return logits (softmax is applied) or probabilities (renormalised).
///   - clock: nanoseconds, injectable for tests; read three times per stage (before the input is
///     prepared, before the stage runs, after it).
///   - prepare: an image stage's input from the photo (which the closure captures).
///   - run: the stage's raw scores (ordered like `labels`) and, when `step.featuresWanted`, its features.
public func runCascade<Image, Features>(
    _ spec: CascadeSpec,
    preprocessing: Preprocessing,
    outputKind: OutputKind,
    labels: [String],
    topK: Int = 5,
    clock: () -> UInt64 = Stopwatch.nowNanoseconds,
    prepare: (CascadeStep) throws -> Image,
    run: (CascadeStep, CascadeStageInput<Image, Features>) throws -> CascadeStageOutput<Features>
) throws -> CascadeResult {
    try spec.validate()
    var runs: [CascadeStageRun] = []
    var features: Features?
    for (i, stage) in spec.stages.enumerated() {
        let isLast = i == spec.lastStageIndex
        let step = CascadeStep(index: i, stage: stage, preprocessing: spec.preprocessing(stage: i, base: preprocessing),
                               isLast: isLast, featuresWanted: !isLast && spec.stages[i + 1].takesFeatures)
        let t0 = clock()
        let input: CascadeStageInput<Image, Features>
        if stage.takesFeatures {
            // validate(): only a depth cascade's later stages, whose features_from is the previous stage
            guard let f = features, let from = stage.featuresFrom else {
                throw CascadeError.stageOutput(stage: spec.stages[i - 1].name, "returned no features for \(stage.name)")
            }
            input = .features(f, from: from)
        } else {
            input = .image(try prepare(step))
        }
        let t1 = clock()
        let output = try run(step, input)
        let t2 = clock()
        features = step.featuresWanted ? output.features : nil
        let scores = output.scores
        guard scores.count == labels.count else {
            throw CascadeError.stageOutput(stage: stage.name, "returned \(scores.count) scores for \(labels.count) labels")
        }
        let p = try Classification.probabilities(scores, kind: outputKind)
        runs.append(CascadeStageRun(index: i, name: stage.name, inputSize: stage.inputSize,
                                    featuresFrom: stage.takesFeatures ? stage.featuresFrom : nil, maxProbability: p.max() ?? 0,
                                    preprocessingMs: Double(t1 &- t0) / 1_000_000, inferenceMs: Double(t2 &- t1) / 1_000_000))
        if spec.shouldExit(stageIndex: i, probabilities: p) {
            let predictions = Classification.topK(p, k: topK).map { Prediction(index: $0, label: labels[$0], probability: p[$0]) }
            return CascadeResult(answeringStage: i, stageCount: spec.stages.count, predictions: predictions, runs: runs)
        }
    }
    preconditionFailure("the last stage always answers")
}

/// `runCascade` with a `CascadeStageRunner`.
public func runCascade<Runner: CascadeStageRunner>(
    _ spec: CascadeSpec,
    preprocessing: Preprocessing,
    outputKind: OutputKind,
    labels: [String],
    topK: Int = 5,
    clock: () -> UInt64 = Stopwatch.nowNanoseconds,
    runner: Runner
) throws -> CascadeResult {
    try runCascade(spec, preprocessing: preprocessing, outputKind: outputKind, labels: labels, topK: topK, clock: clock,
                   prepare: runner.prepare, run: runner.run)
}

/// `runCascade` for stages that all take the image (a size cascade): `runStage` returns the raw scores.
/// A depth cascade needs the stages' features: use `run:` or a `CascadeStageRunner`.
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
    try runCascade(spec, preprocessing: preprocessing, outputKind: outputKind, labels: labels, topK: topK, clock: clock,
                   prepare: prepare,
                   run: { (step: CascadeStep, input: CascadeStageInput<Input, Never>) -> CascadeStageOutput<Never> in
                       switch input {
                       case .image(let image): return CascadeStageOutput(scores: try runStage(step, image))
                       case .features(let never, _): switch never {}
                       }
                   })
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

    /// `runCascade` with this manifest's cascade, preprocessing, output kind and labels.
    public func runCascade<Runner: CascadeStageRunner>(
        topK: Int = 5,
        clock: () -> UInt64 = Stopwatch.nowNanoseconds,
        runner: Runner
    ) throws -> CascadeResult {
        guard let cascade else { throw CascadeError.notACascade }
        return try MobileViTKit.runCascade(cascade, preprocessing: preprocessing, outputKind: outputKind, labels: labels,
                                           topK: topK, clock: clock, runner: runner)
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
    /// The whole model alone (`spec.wholeModelName`) when it is not one of the stages (a depth cascade).
    public var wholeModelStats: BenchmarkStats?

    public init(spec: CascadeSpec, stageStats: [BenchmarkStats], wholeModelStats: BenchmarkStats? = nil) throws {
        guard stageStats.count == spec.stages.count else {
            throw CascadeError.inconsistent("\(stageStats.count) benchmark results for \(spec.stages.count) stages")
        }
        guard (wholeModelStats != nil) == spec.wholeModelIsSeparate else {
            throw CascadeError.inconsistent(spec.wholeModelIsSeparate
                ? "no benchmark of the whole model alone (\(spec.wholeModelName)), which is not one of the stages"
                : "a separate whole-model benchmark, but the whole model is the stage \(spec.wholeModelName)")
        }
        self.spec = spec
        self.stageStats = stageStats
        self.wholeModelStats = wholeModelStats
    }

    /// The whole model alone: `whole_model.name`'s benchmark, else the last stage's. The device
    /// report's top level.
    public var referenceStats: BenchmarkStats { wholeModelStats ?? stageStats[stageStats.count - 1] }

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
    /// A report for a cascade artifact: the top-level `rounds_ms` / `stats_ms` are the whole model's
    /// alone (a depth cascade's `whole_model`, a size cascade's last stage: the model at the manifest's
    /// input size); `cascade` adds the per-stage figures.
    public init(manifest: Manifest, device: Device, computeUnits: ComputeUnits, cascade: CascadeBenchmark, created: Date = Date()) {
        self.init(manifest: manifest, device: device, computeUnits: computeUnits,
                  stats: cascade.referenceStats, created: created)
        self.cascade = cascade.reportCascade
    }
}

extension BenchmarkProgress {
    /// Progress over a benchmark of `stages` equal runs, this one being run `stage` (0-based).
    public func combined(stage: Int, of stages: Int) -> BenchmarkProgress {
        BenchmarkProgress(completed: stage * total + completed, total: stages * total, phase: phase, round: round)
    }
}
