// Core ML glue for cascade artifacts (one multi-function `.mlpackage`, one function per stage):
// compiled only where Core ML exists. The decisions and statistics are in Cascade.swift (tested on Linux).
#if canImport(CoreML) && canImport(CoreGraphics)
import CoreGraphics
import CoreML
import Foundation

/// One `CoreMLClassifier` per cascade stage, each loaded with `functionName = stage.name` and checked
/// against the manifest at that stage's input size. Immutable after load; one task at a time.
public final class CoreMLCascade: @unchecked Sendable {
    public let manifest: Manifest
    public let spec: CascadeSpec
    public let computeUnits: ComputeUnits
    /// In stage order; the last one is the model at the manifest's input size.
    public let stages: [CoreMLClassifier]

    public init(manifest: Manifest, computeUnits: ComputeUnits, stages: [CoreMLClassifier]) throws {
        guard let spec = manifest.cascade else { throw CascadeError.notACascade }
        guard stages.count == spec.stages.count else {
            throw CascadeError.inconsistent("\(stages.count) loaded stages for \(spec.stages.count) in the manifest")
        }
        self.manifest = manifest
        self.spec = spec
        self.computeUnits = computeUnits
        self.stages = stages
    }

    /// Loads every stage's function of a multi-function model (`MLModelConfiguration.functionName`,
    /// iOS 18 / macOS 15). An `.mlpackage` is compiled once first.
    @available(iOS 18.0, macOS 15.0, tvOS 18.0, watchOS 11.0, visionOS 2.0, *)
    public static func load(modelURL: URL, manifest: Manifest, computeUnits: ComputeUnits) async throws -> CoreMLCascade {
        guard let spec = manifest.cascade else { throw CascadeError.notACascade }
        var url = modelURL
        if url.pathExtension != "mlmodelc" {
            url = try await MLModel.compileModel(at: url)
        }
        var stages: [CoreMLClassifier] = []
        for (i, stage) in spec.stages.enumerated() {
            let config = MLModelConfiguration()
            config.computeUnits = computeUnits.mlComputeUnits
            config.functionName = stage.name
            let model = try await MLModel.load(contentsOf: url, configuration: config)
            stages.append(try CoreMLClassifier(model: model, manifest: manifest.stageManifest(i), computeUnits: computeUnits))
        }
        return try CoreMLCascade(manifest: manifest, computeUnits: computeUnits, stages: stages)
    }

    /// One photo through the cascade: each stage crops and resizes the photo at its own size.
    public func classify(cgImage: CGImage, topK: Int = 5) throws -> CascadeResult {
        let stages = self.stages
        return try MobileViTKit.runCascade(
            spec, preprocessing: manifest.preprocessing, outputKind: manifest.outputKind, labels: manifest.labels, topK: topK,
            prepare: { step in try stages[step.index].makeInput(cgImage: cgImage) },
            runStage: { step, input in
                let classifier = stages[step.index]
                return try classifier.scores(from: classifier.model.prediction(from: input))
            })
    }

    /// The ModelBench loop on every stage alone (a synthetic input at the stage's size).
    /// - Parameter progress: the stage index and the progress over all stages.
    public func benchmark(
        method: BenchmarkMethod = .modelBench,
        isCancelled: () -> Bool = { false },
        progress: ((Int, BenchmarkProgress) -> Void)? = nil
    ) throws -> CascadeBenchmark {
        var all: [BenchmarkStats] = []
        let n = stages.count
        for (i, stage) in stages.enumerated() {
            let input = try stage.syntheticInput(seed: UInt64(i))
            var report: ((BenchmarkProgress) -> Void)?
            if let progress {
                report = { progress(i, $0.combined(stage: i, of: n)) }
            }
            all.append(try stage.benchmark(input: input, method: method, isCancelled: isCancelled, progress: report))
        }
        return try CascadeBenchmark(spec: spec, stageStats: all)
    }
}
#endif
