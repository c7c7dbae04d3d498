import Foundation

/// The artifact manifest (`<artifact>.json` beside every exported artifact), docs/contracts.md §1.
///
/// Written by `python -m mobilevit_deploy.export`. Unknown keys are ignored (forward compatibility);
/// the keys the app relies on are required, so a manifest that lacks them fails loudly here instead
/// of producing wrong predictions later.
public struct Manifest: Codable, Equatable, Sendable {
    /// The manifest schema this reader understands.
    public static let supportedSchemaVersion = 1

    public var schemaVersion: Int
    public var model: String
    public var target: String
    public var backend: String
    public var precision: String
    /// `null`, or an object such as `{"scheme": "int8", ...}`.
    public var quantization: JSONValue?
    public var input: Input
    public var output: Output
    public var labels: [String]
    public var checkpoint: Checkpoint?
    public var artifact: Artifact
    public var verification: JSONValue?
    public var opsNotDelegated: [String]?
    public var tools: JSONValue?
    public var created: String?
    /// Coarse-to-fine cascade artifacts only (absent otherwise): stages, exit rule, threshold choice.
    public var cascade: CascadeSpec?

    public struct Input: Codable, Equatable, Sendable {
        public var name: String
        /// N, C, H, W.
        public var shape: [Int]
        public var layout: String
        public var colorLayout: String
        public var dtype: String?
        /// `image` (Core ML pixel buffer, normalisation baked into the model) or `tensor`
        /// (the caller normalises with mean/std).
        public var kind: String
        /// On RGB scaled to [0, 1].
        public var mean: [Double]
        public var std: [Double]
        /// Core ML ImageType: y = scale * pixel(0...255) + bias. Optional: derived from mean/std when absent.
        public var scale: Double?
        public var bias: [Double]?
        public var cropPct: Double
        public var interpolation: String

        enum CodingKeys: String, CodingKey {
            case name, shape, layout, dtype, kind, mean, std, scale, bias, interpolation
            case colorLayout = "color_layout"
            case cropPct = "crop_pct"
        }
    }

    public struct Output: Codable, Equatable, Sendable {
        public var name: String
        public var shape: [Int]?
        /// `logits` or `probabilities`.
        public var kind: String
    }

    public struct Checkpoint: Codable, Equatable, Sendable {
        public var path: String?
        public var sha256: String?
    }

    public struct Artifact: Codable, Equatable, Sendable {
        public var file: String
        public var sha256: String
        public var sizeBytes: Int?

        enum CodingKeys: String, CodingKey {
            case file, sha256
            case sizeBytes = "size_bytes"
        }
    }

    enum CodingKeys: String, CodingKey {
        case model, target, backend, precision, quantization, input, output, labels, checkpoint
        case artifact, verification, tools, created, cascade
        case schemaVersion = "schema_version"
        case opsNotDelegated = "ops_not_delegated"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        schemaVersion = try c.decode(Int.self, forKey: .schemaVersion)
        guard schemaVersion == Manifest.supportedSchemaVersion else {
            throw ManifestError.unsupportedSchema(schemaVersion)
        }
        model = try c.decode(String.self, forKey: .model)
        target = try c.decode(String.self, forKey: .target)
        backend = try c.decode(String.self, forKey: .backend)
        precision = try c.decode(String.self, forKey: .precision)
        quantization = try c.decodeIfPresent(JSONValue.self, forKey: .quantization)
        input = try c.decode(Input.self, forKey: .input)
        output = try c.decode(Output.self, forKey: .output)
        labels = try c.decode([String].self, forKey: .labels)
        checkpoint = try c.decodeIfPresent(Checkpoint.self, forKey: .checkpoint)
        artifact = try c.decode(Artifact.self, forKey: .artifact)
        verification = try c.decodeIfPresent(JSONValue.self, forKey: .verification)
        opsNotDelegated = try c.decodeIfPresent([String].self, forKey: .opsNotDelegated)
        tools = try c.decodeIfPresent(JSONValue.self, forKey: .tools)
        created = try c.decodeIfPresent(String.self, forKey: .created)
        cascade = try c.decodeIfPresent(CascadeSpec.self, forKey: .cascade)
    }

    // MARK: - Reading

    /// Decodes and validates a manifest. Accepts strict JSON; falls back to JSON5 so that a
    /// non-finite number written by Python's `json` (`Infinity`, `NaN`, e.g. an SQNR of identical
    /// outputs) does not make the whole manifest unreadable.
    public static func decode(from data: Data) throws -> Manifest {
        let manifest: Manifest
        do {
            manifest = try JSONDecoder().decode(Manifest.self, from: data)
        } catch let error as ManifestError {
            throw error
        } catch let strictError {
            let relaxed = JSONDecoder()
            relaxed.allowsJSON5 = true
            do {
                manifest = try relaxed.decode(Manifest.self, from: data)
            } catch let error as ManifestError {
                throw error
            } catch {
                throw ManifestError.malformed(describe(strictError))
            }
        }
        try manifest.validate()
        return manifest
    }

    public static func load(contentsOf url: URL) throws -> Manifest {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw ManifestError.unreadable(url.path, error.localizedDescription)
        }
        return try decode(from: data)
    }

    /// Structural checks the app relies on; throws the first problem found.
    public func validate() throws {
        func fail(_ msg: String) -> ManifestError { .invalid(msg) }
        guard input.shape.count == 4 else {
            throw fail("input.shape must be [N, C, H, W], got \(input.shape)")
        }
        guard input.layout == "NCHW" else {
            throw fail("input.layout must be NCHW, got \(input.layout)")
        }
        guard input.shape[1] == 3 else { throw fail("input.shape[1] (channels) must be 3, got \(input.shape[1])") }
        guard input.shape[2] > 0, input.shape[3] > 0 else { throw fail("input size must be positive, got \(input.shape)") }
        guard InputKind(rawValue: input.kind) != nil else {
            throw fail("input.kind must be image or tensor, got \(input.kind)")
        }
        guard ["RGB", "BGR"].contains(input.colorLayout) else {
            throw fail("input.color_layout must be RGB or BGR, got \(input.colorLayout)")
        }
        guard input.mean.count == 3, input.std.count == 3 else {
            throw fail("input.mean and input.std need 3 values each")
        }
        guard input.std.allSatisfy({ $0 > 0 }) else { throw fail("input.std must be positive, got \(input.std)") }
        if let bias = input.bias, bias.count != 3 { throw fail("input.bias needs 3 values, got \(bias.count)") }
        if let scale = input.scale, !(scale > 0) { throw fail("input.scale must be positive, got \(scale)") }
        guard input.cropPct > 0, input.cropPct <= 1 else {
            throw fail("input.crop_pct must be in (0, 1], got \(input.cropPct)")
        }
        guard OutputKind(rawValue: output.kind) != nil else {
            throw fail("output.kind must be logits or probabilities, got \(output.kind)")
        }
        guard !labels.isEmpty else { throw fail("labels is empty") }
        if let shape = output.shape, let classes = shape.last, classes != labels.count {
            throw fail("output.shape \(shape) has \(classes) classes but there are \(labels.count) labels")
        }
        guard !artifact.file.isEmpty else { throw fail("artifact.file is empty") }
        if let cascade {
            do {
                try cascade.validate(inputSize: [inputHeight, inputWidth])
            } catch {
                throw fail("cascade: \(error)")
            }
        }
    }

    // MARK: - Derived facts

    /// Input height and width, from `input.shape` (N, C, H, W).
    public var inputHeight: Int { input.shape[2] }
    public var inputWidth: Int { input.shape[3] }

    public var inputKind: InputKind { InputKind(rawValue: input.kind) ?? .tensor }
    public var outputKind: OutputKind { OutputKind(rawValue: output.kind) ?? .logits }

    /// The precision label a device report carries: the quantization scheme when the artifact is
    /// quantized (e.g. `int8`), the float compute precision otherwise (`fp16`, `fp32`).
    public var reportPrecision: String {
        if let scheme = quantization?["scheme"]?.stringValue, !scheme.isEmpty { return scheme }
        return precision
    }

    /// The artifact file name without its extension (`mobilevit_xxs.mlpackage` -> `mobilevit_xxs`):
    /// the name Xcode gives the compiled model (`mobilevit_xxs.mlmodelc`) in the app bundle.
    public var artifactStem: String {
        ModelFiles.stem(ofArtifact: artifact.file)
    }

    public var preprocessing: Preprocessing { Preprocessing(manifest: self) }
}

public enum InputKind: String, Sendable {
    case image
    case tensor
}

public enum OutputKind: String, Sendable {
    case logits
    case probabilities
}

public enum ManifestError: Error, Equatable, CustomStringConvertible, LocalizedError {
    case unreadable(String, String)
    case malformed(String)
    case unsupportedSchema(Int)
    case invalid(String)

    public var description: String {
        switch self {
        case .unreadable(let path, let why): return "cannot read manifest \(path): \(why)"
        case .malformed(let why): return "manifest is not valid: \(why)"
        case .unsupportedSchema(let v):
            return "manifest schema_version \(v) is not supported (this reader understands \(Manifest.supportedSchemaVersion))"
        case .invalid(let why): return "manifest is inconsistent: \(why)"
        }
    }

    public var errorDescription: String? { description }
}

/// Naming rules for artifacts and their manifests inside the app bundle.
public enum ModelFiles {
    public static let manifestSuffix = ".mlpackage.json"

    /// `mobilevit_xxs.mlpackage` -> `mobilevit_xxs`; a name without an extension is returned as is.
    public static func stem(ofArtifact file: String) -> String {
        let name = file.split(separator: "/").last.map(String.init) ?? file
        guard let dot = name.lastIndex(of: "."), dot != name.startIndex else { return name }
        return String(name[..<dot])
    }

    /// `mobilevit_xxs.mlpackage.json` -> `mobilevit_xxs`; nil for files that are not Core ML manifests.
    public static func stem(ofManifest file: String) -> String? {
        guard file.hasSuffix(manifestSuffix), file.count > manifestSuffix.count else { return nil }
        return String(file.dropLast(manifestSuffix.count))
    }
}

/// A readable one-line account of a decoding error (the key path and what was wrong).
func describe(_ error: Error) -> String {
    guard let e = error as? DecodingError else { return "\(error)" }
    func path(_ keys: [CodingKey]) -> String {
        keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }
    switch e {
    case .keyNotFound(let key, let ctx):
        let p = path(ctx.codingPath + [key])
        return "missing key \(p)"
    case .typeMismatch(_, let ctx), .valueNotFound(_, let ctx):
        return "wrong type at \(path(ctx.codingPath)): \(ctx.debugDescription)"
    case .dataCorrupted(let ctx):
        return ctx.codingPath.isEmpty ? ctx.debugDescription : "\(path(ctx.codingPath)): \(ctx.debugDescription)"
    @unknown default:
        return "\(e)"
    }
}
