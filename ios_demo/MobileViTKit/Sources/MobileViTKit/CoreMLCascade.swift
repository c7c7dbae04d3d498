// Core ML glue for cascade artifacts (one multi-function `.mlpackage`, one function per stage, plus a
// depth cascade's whole model): compiled only where Core ML exists. The decisions and statistics are
// in Cascade.swift (tested on Linux).
#if canImport(CoreML) && canImport(CoreGraphics)
import CoreGraphics
import CoreML
import Foundation

/// Every function of a cascade, each loaded with `MLModelConfiguration.functionName`. An image stage is
/// a `CoreMLClassifier` checked against the manifest at the stage's size (a depth cascade's exit stage
/// outputs `probabilities` and `features`); a depth cascade's features stage is a bare `MLModel` that
/// is given the previous stage's `features` as-is and outputs `probabilities`. Immutable after load;
/// one task at a time.
public final class CoreMLCascade: @unchecked Sendable {
    public let manifest: Manifest
    public let spec: CascadeSpec
    public let computeUnits: ComputeUnits
    /// One per stage, in order: the function `stage.name`.
    public let models: [MLModel]
    /// Per stage: its classifier when it takes the image, nil when it takes features.
    public let imageStages: [CoreMLClassifier?]
    /// The whole model alone at the manifest's input size (`whole_model.name`, or a size cascade's last
    /// stage): the app's single-model classifier and the benchmark's reference.
    public let wholeModel: CoreMLClassifier

    public init(manifest: Manifest, computeUnits: ComputeUnits, models: [MLModel], imageStages: [CoreMLClassifier?],
                wholeModel: CoreMLClassifier) throws {
        guard let spec = manifest.cascade else { throw CascadeError.notACascade }
        guard models.count == spec.stages.count, imageStages.count == spec.stages.count else {
            throw CascadeError.inconsistent("\(models.count) loaded stages for \(spec.stages.count) in the manifest")
        }
        for (stage, classifier) in zip(spec.stages, imageStages) where (classifier == nil) != stage.takesFeatures {
            throw CascadeError.stageOutput(stage: stage.name, "takes \(stage.input) but was loaded as the other kind")
        }
        self.manifest = manifest
        self.spec = spec
        self.computeUnits = computeUnits
        self.models = models
        self.imageStages = imageStages
        self.wholeModel = wholeModel
    }

    /// Loads every stage's function of a multi-function model (`MLModelConfiguration.functionName`,
    /// iOS 18 / macOS 15), and a depth cascade's whole model. An `.mlpackage` is compiled once first.
    @available(iOS 18.0, macOS 15.0, tvOS 18.0, watchOS 11.0, visionOS 2.0, *)
    public static func load(modelURL: URL, manifest: Manifest, computeUnits: ComputeUnits) async throws -> CoreMLCascade {
        guard let spec = manifest.cascade else { throw CascadeError.notACascade }
        var compiled = modelURL
        if compiled.pathExtension != "mlmodelc" {
            compiled = try await MLModel.compileModel(at: compiled)
        }
        let url = compiled
        func function(_ name: String) async throws -> MLModel {
            let config = MLModelConfiguration()
            config.computeUnits = computeUnits.mlComputeUnits
            config.functionName = name
            return try await MLModel.load(contentsOf: url, configuration: config)
        }
        var models: [MLModel] = []
        var imageStages: [CoreMLClassifier?] = []
        for (i, stage) in spec.stages.enumerated() {
            let model = try await function(stage.name)
            let desc = model.modelDescription
            if stage.takesFeatures {
                // the features stage: features in, probabilities out
                guard let input = desc.inputDescriptionsByName[CascadeSpec.featuresName] else {
                    throw CoreMLClassifierError.inputMissing(CascadeSpec.featuresName, available: desc.inputDescriptionsByName.keys.sorted())
                }
                guard let c = input.multiArrayConstraint else {
                    throw CoreMLClassifierError.inputType("\(stage.name): input \"features\" is not a multi-array")
                }
                if let shape = stage.featuresShape, c.shape.map(\.intValue) != shape {
                    throw CoreMLClassifierError.inputType("\(stage.name): features input is \(c.shape.map(\.intValue)), the manifest says \(shape)")
                }
                guard desc.outputDescriptionsByName[CascadeSpec.probabilitiesName] != nil else {
                    throw CoreMLClassifierError.outputMissing(CascadeSpec.probabilitiesName, available: desc.outputDescriptionsByName.keys.sorted())
                }
                imageStages.append(nil)
            } else {
                imageStages.append(try CoreMLClassifier(model: model, manifest: manifest.stageManifest(i), computeUnits: computeUnits))
            }
            if i < spec.lastStageIndex, spec.stages[i + 1].takesFeatures, desc.outputDescriptionsByName[CascadeSpec.featuresName] == nil {
                throw CoreMLClassifierError.outputMissing(CascadeSpec.featuresName, available: desc.outputDescriptionsByName.keys.sorted())
            }
            models.append(model)
        }
        let whole: CoreMLClassifier
        if spec.wholeModelIsSeparate {
            whole = try CoreMLClassifier(model: try await function(spec.wholeModelName), manifest: manifest.wholeModelManifest,
                                         computeUnits: computeUnits)
        } else if let i = spec.stages.firstIndex(where: { $0.name == spec.wholeModelName }), let c = imageStages[i] {
            whole = c
        } else {
            throw CascadeError.inconsistent("the whole model \(spec.wholeModelName) is a stage that does not take the image")
        }
        return try CoreMLCascade(manifest: manifest, computeUnits: computeUnits, models: models, imageStages: imageStages,
                                 wholeModel: whole)
    }

    /// One photo through the cascade: an image stage crops and resizes the photo at its own size; a
    /// features stage gets the previous stage's `features` output.
    public func classify(cgImage: CGImage, topK: Int = 5) throws -> CascadeResult {
        try manifest.runCascade(topK: topK, runner: Runner(cascade: self, cgImage: cgImage))
    }

    /// Runs the stages' functions for one photo.
    struct Runner: CascadeStageRunner {
        let cascade: CoreMLCascade
        let cgImage: CGImage

        func prepare(_ step: CascadeStep) throws -> MLFeatureProvider {
            try cascade.imageStages[step.index]!.makeInput(cgImage: cgImage)
        }

        func run(_ step: CascadeStep, input: CascadeStageInput<MLFeatureProvider, MLMultiArray>) throws -> CascadeStageOutput<MLMultiArray> {
            let model = cascade.models[step.index]
            switch input {
            case .image(let provider):
                let output = try model.prediction(from: provider)
                let scores = try cascade.imageStages[step.index]!.scores(from: output)
                guard step.featuresWanted else { return CascadeStageOutput(scores: scores) }
                guard let features = output.featureValue(for: CascadeSpec.featuresName)?.multiArrayValue else {
                    throw CoreMLClassifierError.outputMissing(CascadeSpec.featuresName, available: output.featureNames.sorted())
                }
                return CascadeStageOutput(scores: scores, features: features)
            case .features(let features, _):
                let output = try model.prediction(from: MLDictionaryFeatureProvider(
                    dictionary: [CascadeSpec.featuresName: MLFeatureValue(multiArray: features)]))
                guard let p = output.featureValue(for: CascadeSpec.probabilitiesName)?.multiArrayValue else {
                    throw CoreMLClassifierError.outputMissing(CascadeSpec.probabilitiesName, available: output.featureNames.sorted())
                }
                return CascadeStageOutput(scores: (0..<p.count).map { p[$0].doubleValue })
            }
        }
    }

    /// The ModelBench loop on every stage alone (an image stage: a synthetic image at its size; a
    /// features stage: synthetic features of its input's shape), then on a separate whole model.
    /// - Parameter progress: the index (of `spec.benchmarkCount`) and the progress over all of them.
    public func benchmark(
        method: BenchmarkMethod = .modelBench,
        isCancelled: () -> Bool = { false },
        progress: ((Int, BenchmarkProgress) -> Void)? = nil
    ) throws -> CascadeBenchmark {
        let n = spec.benchmarkCount
        func report(_ i: Int) -> ((BenchmarkProgress) -> Void)? {
            guard let progress else { return nil }
            return { progress(i, $0.combined(stage: i, of: n)) }
        }
        var stageStats: [BenchmarkStats] = []
        for i in spec.stages.indices {
            let input: MLFeatureProvider
            if let classifier = imageStages[i] {
                input = try classifier.syntheticInput(seed: UInt64(i))
            } else {
                input = try CoreMLCascade.syntheticFeatures(for: models[i], seed: UInt64(i))
            }
            let model = models[i]
            let options = MLPredictionOptions()
            let timings = try BenchmarkLoop.run(method: method, isCancelled: isCancelled, progress: report(i)) {
                try autoreleasepool { _ = try model.prediction(from: input, options: options) }
            }
            stageStats.append(try BenchmarkStats(method: method, timingsMs: timings))
        }
        var whole: BenchmarkStats?
        if spec.wholeModelIsSeparate {
            whole = try wholeModel.benchmark(input: wholeModel.syntheticInput(seed: UInt64(n - 1)), method: method,
                                             isCancelled: isCancelled, progress: report(n - 1))
        }
        return try CascadeBenchmark(spec: spec, stageStats: stageStats, wholeModelStats: whole)
    }

    /// Deterministic features in [-1, 1] of the features input's shape and type (latency does not
    /// depend on content).
    static func syntheticFeatures(for model: MLModel, seed: UInt64) throws -> MLFeatureProvider {
        guard let c = model.modelDescription.inputDescriptionsByName[CascadeSpec.featuresName]?.multiArrayConstraint else {
            throw CoreMLClassifierError.inputType("no multi-array input \"features\"")
        }
        let array = try MLMultiArray(shape: c.shape, dataType: c.dataType)
        var rng = SplitMix64(seed: seed)
        for i in 0..<array.count { array[i] = NSNumber(value: Double(rng.next() % 2001) / 1000 - 1) }
        return try MLDictionaryFeatureProvider(dictionary: [CascadeSpec.featuresName: MLFeatureValue(multiArray: array)])
    }
}
#endif
