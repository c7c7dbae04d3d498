// mvkit-report: write a device report (docs/contracts.md §2) with the same Swift code the iOS app's
// benchmark mode uses — from measured timings, or from a seeded synthetic source that is labelled
// as such (device "synthetic (mvkit-report --synthetic)"). Used by the cross-language contract test.
//
//   mvkit-report --manifest M.json --synthetic [--seed N] [--out report.json]
//   mvkit-report --manifest M.json --timings T.json --device-name N --device-identifier I --os O [--out ...]
//
//   common: [--compute-units all|cpuAndNeuralEngine|cpuAndGPU|cpuOnly]
//           [--warmup 10] [--rounds 20] [--inferences 50] [--trim-low 10] [--trim-high 10]
//   T.json: [[ms, ...], ...] — `rounds` arrays of `inferences` per-inference timings, warm-up excluded.
//
// With --synthetic and a cascade manifest, every stage gets synthetic timings (scaled by its pixel
// count) and the report carries the `cascade` object; the top level is the whole model's (a size
// cascade's last stage, a depth cascade's `whole_model`, which gets synthetic timings of its own).
//
// Exit status: 0 ok, 1 bad input files, 2 usage error.
import Foundation
import MobileViTKit

func fail(_ message: String, status: Int32) -> Never {
    FileHandle.standardError.write(Data("mvkit-report: \(message)\n".utf8))
    exit(status)
}

let usage = """
usage: mvkit-report --manifest M.json (--synthetic [--seed N] | --timings T.json --device-name N \
--device-identifier I --os O) [--compute-units U] [--warmup N] [--rounds N] [--inferences N] \
[--trim-low N] [--trim-high N] [--out PATH]
"""

var options: [String: String] = [:]
var synthetic = false
var args = Array(CommandLine.arguments.dropFirst())
let valued: Set<String> = [
    "--manifest", "--seed", "--timings", "--device-name", "--device-identifier", "--os", "--compute-units",
    "--warmup", "--rounds", "--inferences", "--trim-low", "--trim-high", "--out",
]
while !args.isEmpty {
    let a = args.removeFirst()
    if a == "--synthetic" {
        synthetic = true
    } else if a == "-h" || a == "--help" {
        print(usage)
        exit(0)
    } else if valued.contains(a) {
        guard let v = args.first else { fail("\(a) needs a value\n\(usage)", status: 2) }
        args.removeFirst()
        options[a] = v
    } else {
        fail("unexpected argument \(a)\n\(usage)", status: 2)
    }
}

func intOption(_ name: String, _ fallback: Int) -> Int {
    guard let s = options[name] else { return fallback }
    guard let v = Int(s) else { fail("\(name) needs an integer, got \(s)", status: 2) }
    return v
}

guard let manifestPath = options["--manifest"] else { fail("--manifest is required\n\(usage)", status: 2) }
guard synthetic != (options["--timings"] != nil) else {
    fail("give exactly one of --synthetic and --timings\n\(usage)", status: 2)
}
let unitsName = options["--compute-units"] ?? ComputeUnits.all.rawValue
guard let units = ComputeUnits(rawValue: unitsName) else {
    fail("--compute-units must be one of \(ComputeUnits.allCases.map(\.rawValue).joined(separator: ", "))", status: 2)
}
let defaults = BenchmarkMethod.modelBench
let method = BenchmarkMethod(
    warmup: intOption("--warmup", defaults.warmup),
    rounds: intOption("--rounds", defaults.rounds),
    inferencesPerRound: intOption("--inferences", defaults.inferencesPerRound),
    trimLow: intOption("--trim-low", defaults.trimLow),
    trimHigh: intOption("--trim-high", defaults.trimHigh)
)
do { try method.validate() } catch { fail("\(error)", status: 2) }

let manifest: Manifest
do {
    manifest = try Manifest.load(contentsOf: URL(fileURLWithPath: manifestPath))
} catch {
    fail("\(manifestPath): \(error)", status: 1)
}

let timings: [[Double]]
let device: DeviceReport.Device
if synthetic {
    let seed = UInt64(intOption("--seed", 0))
    timings = SyntheticTimings.generate(method: method, seed: seed)
    device = .init(name: SyntheticTimings.deviceName, identifier: SyntheticTimings.deviceIdentifier,
                   os: ProcessInfo.processInfo.operatingSystemVersionString)
} else {
    let path = options["--timings"]!
    guard let name = options["--device-name"], let ident = options["--device-identifier"], let os = options["--os"] else {
        fail("--timings needs --device-name, --device-identifier and --os", status: 2)
    }
    do {
        timings = try JSONDecoder().decode([[Double]].self, from: Data(contentsOf: URL(fileURLWithPath: path)))
    } catch {
        fail("\(path): not a JSON array of arrays of numbers (\(error))", status: 1)
    }
    device = .init(name: name, identifier: ident, os: os)
}

let data: Data
do {
    if synthetic, let cascade = manifest.cascade {
        let seed = UInt64(intOption("--seed", 0))
        let last = Double(manifest.inputHeight * manifest.inputWidth)
        let stageStats = try cascade.stages.enumerated().map { i, stage in
            let base = 5.0 * Double(stage.height * stage.width) / last
            return try BenchmarkStats(method: method, timingsMs: SyntheticTimings.generate(
                method: method, seed: seed &+ UInt64(i), baseMs: base))
        }
        // A depth cascade's whole model alone is a function of its own, at the manifest's input size.
        let wholeStats = cascade.wholeModelIsSeparate
            ? try BenchmarkStats(method: method, timingsMs: SyntheticTimings.generate(
                method: method, seed: seed &+ UInt64(cascade.stages.count), baseMs: 5.0))
            : nil
        let bench = try CascadeBenchmark(spec: cascade, stageStats: stageStats, wholeModelStats: wholeStats)
        data = try DeviceReport(manifest: manifest, device: device, computeUnits: units, cascade: bench).encoded()
    } else {
        let stats = try BenchmarkStats(method: method, timingsMs: timings)
        data = try DeviceReport(manifest: manifest, device: device, computeUnits: units, stats: stats).encoded()
    }
} catch {
    fail("\(error)", status: 1)
}
if let out = options["--out"], out != "-" {
    do { try data.write(to: URL(fileURLWithPath: out), options: .atomic) } catch { fail("\(out): \(error)", status: 1) }
    FileHandle.standardError.write(Data("mvkit-report: wrote \(out)\(synthetic ? " (SYNTHETIC timings)" : "")\n".utf8))
} else {
    FileHandle.standardOutput.write(data)
}
