// mvkit-manifest: decode and validate an artifact manifest (docs/contracts.md §1) with the same
// Swift code the iOS app uses, and print what the app would read from it.
//
//   mvkit-manifest [--json] [--image-size WxH] <manifest.json>
//
// Exit status: 0 ok, 1 the manifest does not decode or validate, 2 usage error.
import Foundation
import MobileViTKit

func fail(_ message: String, status: Int32) -> Never {
    FileHandle.standardError.write(Data("mvkit-manifest: \(message)\n".utf8))
    exit(status)
}

let usage = "usage: mvkit-manifest [--json] [--image-size WxH] <manifest.json>"
var args = Array(CommandLine.arguments.dropFirst())
var asJSON = false
var imageSize: (Int, Int)?
var path: String?
while !args.isEmpty {
    let a = args.removeFirst()
    switch a {
    case "--json":
        asJSON = true
    case "--image-size":
        let parts = (args.first ?? "").split(separator: "x").compactMap { Int($0) }
        guard parts.count == 2, parts[0] > 0, parts[1] > 0 else {
            fail("--image-size needs WxH, e.g. 640x480\n\(usage)", status: 2)
        }
        args.removeFirst()
        imageSize = (parts[0], parts[1])
    case "-h", "--help":
        print(usage)
        exit(0)
    default:
        if a.hasPrefix("-") || path != nil { fail("unexpected argument \(a)\n\(usage)", status: 2) }
        path = a
    }
}
guard let path else { fail(usage, status: 2) }

let manifest: Manifest
do {
    manifest = try Manifest.load(contentsOf: URL(fileURLWithPath: path))
} catch {
    fail("\(path): \(error)", status: 1)
}
let pre = manifest.preprocessing

if asJSON {
    var out: [String: JSONValue] = [
        "model": .string(manifest.model),
        "target": .string(manifest.target),
        "precision": .string(manifest.reportPrecision),
        "input_name": .string(manifest.input.name),
        "input_kind": .string(manifest.input.kind),
        "input_size": .array([.number(Double(manifest.inputHeight)), .number(Double(manifest.inputWidth))]),
        "num_labels": .number(Double(manifest.labels.count)),
        "first_label": .string(manifest.labels[0]),
        "output_name": .string(manifest.output.name),
        "output_kind": .string(manifest.output.kind),
        "scale": .number(pre.scale),
        "bias": .array(pre.bias.map { .number($0) }),
        "crop_pct": .number(pre.cropPct),
        "artifact_sha256": .string(manifest.artifact.sha256),
    ]
    if let cascade = manifest.cascade {
        out["cascade"] = .object([
            "stages": .array(cascade.stages.map { .string($0.name) }),
            "input_sizes": .array(cascade.stages.map { .array($0.inputSize.map { .number(Double($0)) }) }),
            "exit_rule": .string(cascade.exitRule.kind),
            "threshold": .number(cascade.threshold),
            "exit_rates": cascade.thresholdSelection?.exitRates.map { .array($0.map { .number($0) }) } ?? .null,
        ])
        if cascade.kind != .sizes, case .object(var c)? = out["cascade"] {
            c["kind"] = .string(cascade.kind.rawValue)
            c["inputs"] = .array(cascade.stages.map { .string($0.input) })
            c["whole_model"] = .string(cascade.wholeModelName)
            out["cascade"] = .object(c)
        }
    }
    if case let (w, h)? = imageSize {
        let r = pre.cropRect(imageWidth: w, imageHeight: h)
        out["crop_rect"] = .array([r.x, r.y, r.width, r.height].map { .number($0) })
    }
    let e = JSONEncoder()
    e.outputFormatting = [.prettyPrinted, .sortedKeys]
    print(String(decoding: try! e.encode(out), as: UTF8.self))
} else {
    print("model: \(manifest.model) (\(manifest.target), \(manifest.backend), \(manifest.reportPrecision))")
    print("input: \(manifest.input.name) \(manifest.input.kind) \(manifest.inputHeight)x\(manifest.inputWidth) (HxW) \(manifest.input.colorLayout)")
    print("preprocessing: crop_pct \(pre.cropPct) \(pre.interpolation), scale \(pre.scale) bias \(pre.bias)")
    print("output: \(manifest.output.name) (\(manifest.output.kind))")
    print("labels: \(manifest.labels.count)")
    if let cascade = manifest.cascade { print("cascade: \(cascade.summary)") }
    if case let (w, h)? = imageSize {
        print("crop of a \(w)x\(h) image: \(pre.cropRect(imageWidth: w, imageHeight: h))")
    }
}
