import Foundation

/// Core ML compute units as the device report names them (MLComputeUnits case names).
public enum ComputeUnits: String, Codable, CaseIterable, Identifiable, Sendable {
    case all
    case cpuAndNeuralEngine
    case cpuAndGPU
    case cpuOnly

    public var id: String { rawValue }

    public var displayName: String {
        switch self {
        case .all: return "All"
        case .cpuAndNeuralEngine: return "CPU + Neural Engine"
        case .cpuAndGPU: return "CPU + GPU"
        case .cpuOnly: return "CPU only"
        }
    }
}

/// The device report written by the app's benchmark mode and read by
/// `python -m mobilevit_deploy.bench --device-report` (docs/contracts.md §2).
public struct DeviceReport: Codable, Equatable, Sendable {
    public static let schemaVersion = 1

    public struct Device: Codable, Equatable, Sendable {
        public var name: String
        public var identifier: String
        public var os: String

        public init(name: String, identifier: String, os: String) {
            self.name = name
            self.identifier = identifier
            self.os = os
        }
    }

    public var schemaVersion: Int
    public var device: Device
    public var computeUnits: ComputeUnits
    public var model: String
    public var precision: String
    /// H, W.
    public var inputSize: [Int]
    public var artifactSha256: String
    public var method: BenchmarkMethod
    public var roundsMs: [Double]
    public var statsMs: SummaryStats
    public var created: String
    /// Cascade artifacts only (absent otherwise): exit rates and per-stage latency.
    public var cascade: Cascade?

    /// The report's optional `cascade` object (docs/contracts.md §2).
    public struct Cascade: Codable, Equatable, Sendable {
        /// Per stage: fraction of images it answered (sums to 1).
        public var exitRates: [Double]
        /// Per stage: its mean latency, ms.
        public var stageLatencyMs: [Double]
        /// Mean model time per image through the cascade, ms.
        public var meanLatencyMs: Double
        public var threshold: Double
        /// `threshold_selection` (exit rates from the manifest, mean latency expected from them) or
        /// `measured` (both from cascade runs on the device).
        public var exitRatesSource: String?

        public init(exitRates: [Double], stageLatencyMs: [Double], meanLatencyMs: Double, threshold: Double,
                    exitRatesSource: String? = nil) {
            self.exitRates = exitRates
            self.stageLatencyMs = stageLatencyMs.map { roundTo($0, BenchmarkStats.reportedDigits) }
            self.meanLatencyMs = roundTo(meanLatencyMs, BenchmarkStats.reportedDigits)
            self.threshold = threshold
            self.exitRatesSource = exitRatesSource
        }

        enum CodingKeys: String, CodingKey {
            case threshold
            case exitRates = "exit_rates"
            case stageLatencyMs = "stage_latency_ms"
            case meanLatencyMs = "mean_latency_ms"
            case exitRatesSource = "exit_rates_source"
        }
    }

    enum CodingKeys: String, CodingKey {
        case device, model, precision, method, created, cascade
        case schemaVersion = "schema_version"
        case computeUnits = "compute_units"
        case inputSize = "input_size"
        case artifactSha256 = "artifact_sha256"
        case roundsMs = "rounds_ms"
        case statsMs = "stats_ms"
    }

    public init(schemaVersion: Int = DeviceReport.schemaVersion, device: Device, computeUnits: ComputeUnits,
                model: String, precision: String, inputSize: [Int], artifactSha256: String,
                method: BenchmarkMethod, roundsMs: [Double], statsMs: SummaryStats, created: String,
                cascade: Cascade? = nil) {
        self.schemaVersion = schemaVersion
        self.device = device
        self.computeUnits = computeUnits
        self.model = model
        self.precision = precision
        self.inputSize = inputSize
        self.artifactSha256 = artifactSha256
        self.method = method
        self.roundsMs = roundsMs
        self.statsMs = statsMs
        self.created = created
        self.cascade = cascade
    }

    /// A report tied to one artifact (through its manifest) and one benchmark run.
    public init(manifest: Manifest, device: Device, computeUnits: ComputeUnits, stats: BenchmarkStats, created: Date = Date()) {
        self.init(
            device: device,
            computeUnits: computeUnits,
            model: manifest.model,
            precision: manifest.reportPrecision,
            inputSize: [manifest.inputHeight, manifest.inputWidth],
            artifactSha256: manifest.artifact.sha256,
            method: stats.method,
            roundsMs: stats.roundsMs,
            statsMs: stats.stats,
            created: DeviceReport.timestamp(created)
        )
    }

    /// `2026-11-23T19:40:00Z` (UTC, whole seconds), as in the contract.
    public static func timestamp(_ date: Date) -> String {
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime]
        f.timeZone = TimeZone(secondsFromGMT: 0)
        return f.string(from: date)
    }

    /// Pretty, key-sorted JSON (stable output: same report, same bytes).
    public func encoded() throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        var data = try e.encode(self)
        data.append(0x0A)
        return data
    }

    public static func decode(from data: Data) throws -> DeviceReport {
        try JSONDecoder().decode(DeviceReport.self, from: data)
    }

    /// A file name that says what was measured, e.g. `device_report_mobilevit_xs_iPhone13-2_all.json`.
    public var suggestedFileName: String {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
        func clean(_ s: String) -> String { String(s.map { allowed.contains($0) ? $0 : "-" }) }
        return "device_report_\(clean(model))_\(clean(device.identifier))_\(computeUnits.rawValue).json"
    }
}

/// Marketing names of iPhones by model identifier (`utsname.machine`), for the report's
/// `device.name`. Unknown identifiers fall back to the identifier itself.
public enum DeviceCatalog {
    public static let iPhoneNames: [String: String] = [
        "iPhone12,1": "iPhone 11", "iPhone12,3": "iPhone 11 Pro", "iPhone12,5": "iPhone 11 Pro Max",
        "iPhone12,8": "iPhone SE (2nd generation)",
        "iPhone13,1": "iPhone 12 mini", "iPhone13,2": "iPhone 12", "iPhone13,3": "iPhone 12 Pro",
        "iPhone13,4": "iPhone 12 Pro Max",
        "iPhone14,4": "iPhone 13 mini", "iPhone14,5": "iPhone 13", "iPhone14,2": "iPhone 13 Pro",
        "iPhone14,3": "iPhone 13 Pro Max", "iPhone14,6": "iPhone SE (3rd generation)",
        "iPhone14,7": "iPhone 14", "iPhone14,8": "iPhone 14 Plus", "iPhone15,2": "iPhone 14 Pro",
        "iPhone15,3": "iPhone 14 Pro Max",
        "iPhone15,4": "iPhone 15", "iPhone15,5": "iPhone 15 Plus", "iPhone16,1": "iPhone 15 Pro",
        "iPhone16,2": "iPhone 15 Pro Max",
        "iPhone17,3": "iPhone 16", "iPhone17,4": "iPhone 16 Plus", "iPhone17,1": "iPhone 16 Pro",
        "iPhone17,2": "iPhone 16 Pro Max", "iPhone17,5": "iPhone 16e",
    ]

    /// - Parameters:
    ///   - identifier: `utsname.machine`, e.g. `iPhone13,2` (on the simulator: `arm64`).
    ///   - isSimulator: true in the iOS simulator, whose timings are the Mac's; the report then
    ///     names no iPhone at all, so the harness can never take it for one.
    public static func device(identifier: String, isSimulator: Bool, os: String) -> DeviceReport.Device {
        if isSimulator {
            return .init(name: "iOS Simulator", identifier: "simulator", os: os)
        }
        return .init(name: iPhoneNames[identifier] ?? identifier, identifier: identifier, os: os)
    }
}
