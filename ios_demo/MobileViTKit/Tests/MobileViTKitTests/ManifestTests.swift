import Foundation
import XCTest
@testable import MobileViTKit

final class ManifestTests: XCTestCase {
    func testFixtureDecodes() throws {
        let m = try Manifest.load(contentsOf: Fixtures.url("manifest"))
        XCTAssertEqual(m.schemaVersion, 1)
        XCTAssertEqual(m.model, "mobilevit_xxs")
        XCTAssertEqual(m.target, "coreml")
        XCTAssertEqual(m.backend, "mlprogram")
        XCTAssertEqual(m.precision, "fp16")
        XCTAssertNil(m.quantization, "null quantization decodes as nil")
        XCTAssertEqual(m.input.name, "image")
        XCTAssertEqual(m.inputKind, .image)
        XCTAssertEqual(m.inputHeight, 256)
        XCTAssertEqual(m.inputWidth, 256)
        XCTAssertEqual(m.input.cropPct, 0.9)
        XCTAssertEqual(m.output.name, "classLabel_probs")
        XCTAssertEqual(m.outputKind, .logits)
        XCTAssertEqual(m.labels.count, 10)
        XCTAssertEqual(m.labels.first, "airplane")
        XCTAssertEqual(m.artifact.file, "mobilevit_xxs.mlpackage")
        XCTAssertEqual(m.artifact.sizeBytes, 2_830_000)
        XCTAssertEqual(m.artifactStem, "mobilevit_xxs")
        XCTAssertEqual(m.reportPrecision, "fp16")
        XCTAssertEqual(m.verification?["sqnr_db"]?.doubleValue, 112.3)
        XCTAssertEqual(m.tools?["coremltools"]?.stringValue, "9.0")
        XCTAssertEqual(m.created, "2026-11-23T19:40:00Z")
    }

    func testNonSquareQuantizedWithUnknownKeys() throws {
        let m = try Manifest.load(contentsOf: Fixtures.url("manifest_int8_nonsquare"))
        XCTAssertEqual(m.inputHeight, 160, "H is shape[2]")
        XCTAssertEqual(m.inputWidth, 224, "W is shape[3]")
        XCTAssertEqual(m.inputKind, .tensor)
        XCTAssertNil(m.input.scale)
        XCTAssertEqual(m.reportPrecision, "int8", "a quantized artifact reports its scheme")
        XCTAssertEqual(m.tools?["executorch"], .null)
        XCTAssertEqual(m.artifactStem, "cmt_tiny_int8")
    }

    func testNonFiniteNumbersFromPythonAreTolerated() throws {
        // Python's json writes `Infinity` for an infinite SQNR (identical outputs).
        var text = String(decoding: try Fixtures.data("manifest"), as: UTF8.self)
        text = text.replacingOccurrences(of: "\"sqnr_db\": 112.3", with: "\"sqnr_db\": Infinity")
        XCTAssertTrue(text.contains("Infinity"))
        let m = try Manifest.decode(from: Data(text.utf8))
        XCTAssertEqual(m.verification?["sqnr_db"]?.doubleValue, .infinity)
    }

    func testMissingRequiredKeyIsNamed() throws {
        var o = try Fixtures.object("manifest")
        var input = try XCTUnwrap(o["input"] as? [String: Any])
        input.removeValue(forKey: "crop_pct")
        o["input"] = input
        XCTAssertThrowsError(try Manifest.decode(from: Fixtures.data(of: o))) { error in
            XCTAssertTrue("\(error)".contains("input.crop_pct"), "\(error)")
        }
    }

    func testNewerSchemaIsRejected() throws {
        var o = try Fixtures.object("manifest")
        o["schema_version"] = 2
        XCTAssertThrowsError(try Manifest.decode(from: Fixtures.data(of: o))) { error in
            XCTAssertEqual(error as? ManifestError, .unsupportedSchema(2))
        }
    }

    func testInconsistentManifestsAreRejected() throws {
        func rejects(_ edit: (inout [String: Any]) throws -> Void, _ expect: String,
                     file: StaticString = #filePath, line: UInt = #line) throws {
            var o = try Fixtures.object("manifest")
            try edit(&o)
            XCTAssertThrowsError(try Manifest.decode(from: Fixtures.data(of: o)), file: file, line: line) { error in
                XCTAssertTrue("\(error)".contains(expect), "\(error) should mention \(expect)", file: file, line: line)
            }
        }
        func editInput(_ o: inout [String: Any], _ key: String, _ value: Any) throws {
            var input = try XCTUnwrap(o["input"] as? [String: Any])
            input[key] = value
            o["input"] = input
        }
        try rejects({ $0["labels"] = ["a", "b"] }, "10 classes but there are 2 labels")
        try rejects({ $0["labels"] = [String]() }, "labels is empty")
        try rejects({ try editInput(&$0, "shape", [1, 3, 256]) }, "input.shape")
        try rejects({ try editInput(&$0, "shape", [1, 1, 256, 256]) }, "channels")
        try rejects({ try editInput(&$0, "layout", "NHWC") }, "NCHW")
        try rejects({ try editInput(&$0, "kind", "pixels") }, "input.kind")
        try rejects({ try editInput(&$0, "crop_pct", 1.5) }, "crop_pct")
        try rejects({ try editInput(&$0, "std", [1.0, 0.0, 1.0]) }, "std")
        try rejects({ $0["output"] = ["name": "y", "kind": "scores"] }, "output.kind")
    }

    func testRoundTripThroughEncoder() throws {
        let m = try Manifest.load(contentsOf: Fixtures.url("manifest"))
        let again = try Manifest.decode(from: JSONEncoder().encode(m))
        XCTAssertEqual(m, again)
    }

    func testModelFileNames() {
        XCTAssertEqual(ModelFiles.stem(ofArtifact: "mobilevit_xs.mlpackage"), "mobilevit_xs")
        XCTAssertEqual(ModelFiles.stem(ofArtifact: "artifacts/mobilevit_xs_int8.mlpackage"), "mobilevit_xs_int8")
        XCTAssertEqual(ModelFiles.stem(ofArtifact: "plain"), "plain")
        XCTAssertEqual(ModelFiles.stem(ofManifest: "mobilevit_xs.mlpackage.json"), "mobilevit_xs")
        XCTAssertNil(ModelFiles.stem(ofManifest: "mobilevit_xs.pte.json"))
        XCTAssertNil(ModelFiles.stem(ofManifest: ".mlpackage.json"))
    }
}
