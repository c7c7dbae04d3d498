// Runs only where Core ML exists (macOS CI) and only when pointed at a real export:
//   MVKIT_MLPACKAGE=artifacts/mobilevit_xxs.mlpackage swift test --package-path ios_demo/MobileViTKit
// (the manifest is read from <mlpackage>.json; MVKIT_SAMPLE_IMAGE may name a photo to classify).
#if canImport(CoreML) && canImport(ImageIO)
import CoreGraphics
import CoreML
import Foundation
import ImageIO
import XCTest
@testable import MobileViTKit

final class CoreMLClassifierTests: XCTestCase {
    private func image(atPath path: String) throws -> CGImage {
        let url = URL(fileURLWithPath: path) as CFURL
        guard let source = CGImageSourceCreateWithURL(url, nil),
              let image = CGImageSourceCreateImageAtIndex(source, 0, nil)
        else { throw CoreMLClassifierError.image("cannot decode \(path)") }
        return image
    }

    /// A 320 x 240 four-colour test card (not square, so the crop matters).
    private func testCard() throws -> CGImage {
        guard let ctx = CGContext(data: nil, width: 320, height: 240, bitsPerComponent: 8, bytesPerRow: 0,
                                  space: CGColorSpaceCreateDeviceRGB(),
                                  bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue)
        else { throw CoreMLClassifierError.image("no context") }
        let colors: [(CGFloat, CGFloat, CGFloat)] = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]
        for (i, c) in colors.enumerated() {
            ctx.setFillColor(red: c.0, green: c.1, blue: c.2, alpha: 1)
            ctx.fill(CGRect(x: (i % 2) * 160, y: (i / 2) * 120, width: 160, height: 120))
        }
        guard let image = ctx.makeImage() else { throw CoreMLClassifierError.image("no image") }
        return image
    }

    func testExportedModelEndToEnd() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let path = env["MVKIT_MLPACKAGE"], !path.isEmpty else {
            throw XCTSkip("set MVKIT_MLPACKAGE=<artifact>.mlpackage (manifest beside it) to test Core ML end to end")
        }
        let manifest = try Manifest.load(contentsOf: URL(fileURLWithPath: path + ".json"))
        let classifier = try await CoreMLClassifier.load(
            modelURL: URL(fileURLWithPath: path), manifest: manifest, computeUnits: .cpuOnly)
        XCTAssertEqual(classifier.inputSize.height, manifest.inputHeight)
        XCTAssertEqual(classifier.inputSize.width, manifest.inputWidth)

        let photo = try env["MVKIT_SAMPLE_IMAGE"].map { try image(atPath: $0) } ?? testCard()
        let result = try classifier.classify(cgImage: photo, topK: 5)
        XCTAssertEqual(result.predictions.count, min(5, manifest.labels.count))
        let p = result.predictions.map(\.probability)
        XCTAssertEqual(p, p.sorted(by: >), "ranked")
        XCTAssertTrue(p.allSatisfy { $0 >= 0 && $0 <= 1 })
        XCTAssertLessThanOrEqual(p.reduce(0, +), 1 + 1e-6)
        XCTAssertTrue(result.predictions.allSatisfy { manifest.labels.contains($0.label) })
        XCTAssertGreaterThan(result.inferenceMs, 0)

        let method = BenchmarkMethod(warmup: 2, rounds: 3, inferencesPerRound: 6, trimLow: 1, trimHigh: 1)
        let stats = try classifier.benchmark(input: classifier.syntheticInput(), method: method)
        XCTAssertEqual(stats.roundsMs.count, 3)
        XCTAssertGreaterThan(stats.stats.median, 0)
        let report = DeviceReport(manifest: manifest, device: .init(name: "swift test", identifier: "macos-test", os: "macOS"),
                                  computeUnits: .cpuOnly, stats: stats)
        XCTAssertEqual(try DeviceReport.decode(from: report.encoded()), report)
        XCTAssertEqual(report.artifactSha256, manifest.artifact.sha256)
    }
}
#endif
