// Core ML glue: compiled only where Core ML exists (iOS, macOS). It lives in the package rather than
// in the app so that `swift build` / `swift test` on a Mac type-checks it; on Linux it is skipped.
#if canImport(CoreML) && canImport(CoreGraphics)
import CoreGraphics
import CoreML
import Foundation
#if canImport(Darwin)
import Darwin
#endif

extension ComputeUnits {
    public var mlComputeUnits: MLComputeUnits {
        switch self {
        case .all: return .all
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuOnly: return .cpuOnly
        }
    }
}

public enum CoreMLClassifierError: Error, CustomStringConvertible, LocalizedError {
    case inputMissing(String, available: [String])
    case outputMissing(String, available: [String])
    case inputType(String)
    case sizeMismatch(model: [Int], manifest: [Int])
    case labelsMismatch(String)
    case outputType(String)
    case image(String)

    public var description: String {
        switch self {
        case .inputMissing(let n, let a): return "model has no input \"\(n)\" (inputs: \(a.joined(separator: ", ")))"
        case .outputMissing(let n, let a): return "model has no output \"\(n)\" (outputs: \(a.joined(separator: ", ")))"
        case .inputType(let why): return "unsupported model input: \(why)"
        case .sizeMismatch(let m, let f): return "model input is \(m[0])x\(m[1]) (HxW) but the manifest says \(f[0])x\(f[1])"
        case .labelsMismatch(let why): return "labels disagree between model and manifest: \(why)"
        case .outputType(let why): return "unsupported model output: \(why)"
        case .image(let why): return "cannot prepare the image: \(why)"
        }
    }

    public var errorDescription: String? { description }
}

/// One classification: top-k and the time spent.
public struct ClassificationResult: Sendable {
    public var predictions: [Prediction]
    /// `MLModel.prediction` alone.
    public var inferenceMs: Double
    /// Crop, resize and conversion to the model's input.
    public var preprocessingMs: Double
}

/// A Core ML classifier whose input geometry comes from the model description and whose labels,
/// output kind and crop come from the manifest; the two are cross-checked when loading.
/// Immutable after init; the app calls it from one task at a time.
public final class CoreMLClassifier: @unchecked Sendable {
    public let manifest: Manifest
    public let model: MLModel
    public let computeUnits: ComputeUnits
    /// The manifest's preprocessing with the input size the model itself declares.
    public let preprocessing: Preprocessing

    private let inputName: String
    private let outputName: String
    private let imageConstraint: MLImageConstraint?
    private let arrayConstraint: MLMultiArrayConstraint?

    /// Loads a compiled model (`.mlmodelc`); an `.mlpackage` / `.mlmodel` is compiled first.
    public static func load(modelURL: URL, manifest: Manifest, computeUnits: ComputeUnits) async throws -> CoreMLClassifier {
        var url = modelURL
        if url.pathExtension != "mlmodelc" {
            url = try await MLModel.compileModel(at: url)
        }
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits.mlComputeUnits
        let model = try await MLModel.load(contentsOf: url, configuration: config)
        return try CoreMLClassifier(model: model, manifest: manifest, computeUnits: computeUnits)
    }

    public init(model: MLModel, manifest: Manifest, computeUnits: ComputeUnits) throws {
        self.model = model
        self.manifest = manifest
        self.computeUnits = computeUnits
        let desc = model.modelDescription
        inputName = manifest.input.name
        outputName = manifest.output.name

        guard let input = desc.inputDescriptionsByName[inputName] else {
            throw CoreMLClassifierError.inputMissing(inputName, available: desc.inputDescriptionsByName.keys.sorted())
        }
        guard desc.outputDescriptionsByName[outputName] != nil else {
            throw CoreMLClassifierError.outputMissing(outputName, available: desc.outputDescriptionsByName.keys.sorted())
        }

        var pre = manifest.preprocessing
        let modelHW: [Int]
        switch manifest.inputKind {
        case .image:
            guard let c = input.imageConstraint else {
                throw CoreMLClassifierError.inputType("manifest says image, model input \"\(inputName)\" is not an image")
            }
            imageConstraint = c
            arrayConstraint = nil
            modelHW = [c.pixelsHigh, c.pixelsWide]
        case .tensor:
            guard let c = input.multiArrayConstraint else {
                throw CoreMLClassifierError.inputType("manifest says tensor, model input \"\(inputName)\" is not a multi-array")
            }
            guard c.dataType == .float32 else {
                throw CoreMLClassifierError.inputType("only float32 tensor inputs are supported")
            }
            let shape = c.shape.map { $0.intValue }
            guard shape.count == 4, shape[1] == 3 else {
                throw CoreMLClassifierError.inputType("tensor input shape \(shape) is not [N, 3, H, W]")
            }
            imageConstraint = nil
            arrayConstraint = c
            modelHW = [shape[2], shape[3]]
        }
        let manifestHW = [manifest.inputHeight, manifest.inputWidth]
        guard modelHW == manifestHW else {
            throw CoreMLClassifierError.sizeMismatch(model: modelHW, manifest: manifestHW)
        }
        pre.height = modelHW[0]
        pre.width = modelHW[1]
        preprocessing = pre

        if let modelLabels = desc.classLabels?.map({ "\($0)" }) {
            guard Set(modelLabels) == Set(manifest.labels), modelLabels.count == manifest.labels.count else {
                throw CoreMLClassifierError.labelsMismatch(
                    "model has \(modelLabels.count) class labels, manifest \(manifest.labels.count)")
            }
        }
    }

    /// The input size the model declares, H x W.
    public var inputSize: (height: Int, width: Int) { (preprocessing.height, preprocessing.width) }

    // MARK: - Input

    /// Crops and resizes a photo exactly as the eval transform does and converts it to the model input.
    public func makeInput(cgImage: CGImage) throws -> MLFeatureProvider {
        try makeInput(rgba: CoreMLClassifier.rgbaPixels(of: cgImage, preprocessing: preprocessing))
    }

    /// Model input from `width x height` RGBA pixels (already cropped and resized).
    public func makeInput(rgba: [UInt8]) throws -> MLFeatureProvider {
        let w = preprocessing.width, h = preprocessing.height
        guard rgba.count == w * h * 4 else { throw CoreMLClassifierError.image("expected \(w)x\(h) RGBA pixels") }
        let value: MLFeatureValue
        if let constraint = imageConstraint {
            let image = try CoreMLClassifier.cgImage(rgba: rgba, width: w, height: h)
            value = try MLFeatureValue(cgImage: image, constraint: constraint, options: nil)
        } else {
            let tensor = preprocessing.normalizedTensor(rgba: rgba)
            let array = try MLMultiArray(shape: [1, 3, NSNumber(value: h), NSNumber(value: w)], dataType: .float32)
            array.withUnsafeMutableBufferPointer(ofType: Float.self) { ptr, strides in
                for c in 0..<3 {
                    for y in 0..<h {
                        for x in 0..<w {
                            ptr[c * strides[1] + y * strides[2] + x * strides[3]] = tensor[(c * h + y) * w + x]
                        }
                    }
                }
            }
            value = MLFeatureValue(multiArray: array)
        }
        return try MLDictionaryFeatureProvider(dictionary: [inputName: value])
    }

    /// A deterministic, photo-free input for benchmarking (latency does not depend on content).
    public func syntheticInput(seed: UInt64 = 0) throws -> MLFeatureProvider {
        var rng = SplitMix64(seed: seed)
        let n = preprocessing.width * preprocessing.height
        var rgba = [UInt8](repeating: 255, count: n * 4)
        for i in 0..<n {
            for c in 0..<3 { rgba[i * 4 + c] = UInt8(truncatingIfNeeded: rng.next()) }
        }
        return try makeInput(rgba: rgba)
    }

    // MARK: - Prediction

    public func classify(cgImage: CGImage, topK: Int = 5) throws -> ClassificationResult {
        var input: MLFeatureProvider?
        let preMs = try Stopwatch.measureMs { input = try makeInput(cgImage: cgImage) }
        var output: MLFeatureProvider?
        let inferMs = try Stopwatch.measureMs { output = try model.prediction(from: input!) }
        let scores = try scores(from: output!)
        let predictions = try Classification.rank(scores, kind: manifest.outputKind, labels: manifest.labels, k: topK)
        return ClassificationResult(predictions: predictions, inferenceMs: inferMs, preprocessingMs: preMs)
    }

    /// Raw scores ordered like the manifest's labels, from a dictionary (classifier) or multi-array output.
    public func scores(from output: MLFeatureProvider) throws -> [Double] {
        guard let value = output.featureValue(for: outputName) else {
            throw CoreMLClassifierError.outputMissing(outputName, available: Array(output.featureNames).sorted())
        }
        switch value.type {
        case .dictionary:
            var dict: [String: Double] = [:]
            for (k, v) in value.dictionaryValue { dict[(k.base as? String) ?? "\(k.base)"] = v.doubleValue }
            return try Classification.scores(fromDictionary: dict, labels: manifest.labels)
        case .multiArray:
            guard let array = value.multiArrayValue else { throw CoreMLClassifierError.outputType("empty multi-array") }
            guard array.count == manifest.labels.count else {
                throw ClassificationError.scoreCount(got: array.count, labels: manifest.labels.count)
            }
            return (0..<array.count).map { array[$0].doubleValue }
        default:
            throw CoreMLClassifierError.outputType("output \"\(outputName)\" is neither a dictionary nor a multi-array")
        }
    }

    /// The ModelBench loop on one fixed input with this classifier's compute units.
    public func benchmark(
        input: MLFeatureProvider,
        method: BenchmarkMethod = .modelBench,
        isCancelled: () -> Bool = { false },
        progress: ((BenchmarkProgress) -> Void)? = nil
    ) throws -> BenchmarkStats {
        let model = self.model
        let options = MLPredictionOptions()
        let timings = try BenchmarkLoop.run(method: method, isCancelled: isCancelled, progress: progress) {
            try autoreleasepool {
                _ = try model.prediction(from: input, options: options)
            }
        }
        return try BenchmarkStats(method: method, timingsMs: timings)
    }

    // MARK: - Pixels

    /// Crop rectangle from the manifest's eval transform, then a high-quality resize to the model size.
    public static func rgbaPixels(of image: CGImage, preprocessing pre: Preprocessing) throws -> [UInt8] {
        let r = pre.cropRect(imageWidth: image.width, imageHeight: image.height)
        let bounds = CGRect(x: 0, y: 0, width: image.width, height: image.height)
        let rect = CGRect(x: r.x.rounded(), y: r.y.rounded(), width: r.width.rounded(), height: r.height.rounded())
            .intersection(bounds)
        guard !rect.isEmpty, let cropped = image.cropping(to: rect) else {
            throw CoreMLClassifierError.image("cannot crop \(image.width)x\(image.height) to \(r)")
        }
        let w = pre.width, h = pre.height
        var pixels = [UInt8](repeating: 0, count: w * h * 4)
        let drawn: Bool = pixels.withUnsafeMutableBytes { buffer in
            guard let ctx = CGContext(
                data: buffer.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue
            ) else { return false }
            ctx.interpolationQuality = .high
            ctx.draw(cropped, in: CGRect(x: 0, y: 0, width: w, height: h))
            return true
        }
        guard drawn else { throw CoreMLClassifierError.image("cannot create a \(w)x\(h) bitmap") }
        return pixels
    }

    static func cgImage(rgba: [UInt8], width w: Int, height h: Int) throws -> CGImage {
        guard let provider = CGDataProvider(data: Data(rgba) as CFData),
              let image = CGImage(
                width: w, height: h, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: w * 4,
                space: CGColorSpaceCreateDeviceRGB(),
                bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
        else { throw CoreMLClassifierError.image("cannot wrap \(w)x\(h) pixels as a CGImage") }
        return image
    }
}

#if canImport(Darwin)
/// The hardware model identifier (`utsname.machine`), e.g. `iPhone13,2`.
public func machineIdentifier() -> String {
    var info = utsname()
    uname(&info)
    return withUnsafeBytes(of: &info.machine) { raw in
        let bytes = raw.prefix { $0 != 0 }
        return String(decoding: bytes, as: UTF8.self)
    }
}
#endif
#endif
