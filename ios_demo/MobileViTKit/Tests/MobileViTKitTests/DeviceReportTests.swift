import Foundation
import XCTest
@testable import MobileViTKit

final class DeviceReportTests: XCTestCase {
    private func makeReport() throws -> DeviceReport {
        let manifest = try Manifest.load(contentsOf: Fixtures.url("manifest"))
        let method = BenchmarkMethod(warmup: 2, rounds: 3, inferencesPerRound: 5, trimLow: 1, trimHigh: 1)
        let stats = try BenchmarkStats(method: method, timingsMs: [[7, 7.1, 7.2, 7.3, 9], [6.9, 7, 7, 7, 7], [7, 7.2, 7.2, 7.2, 1]])
        let device = DeviceCatalog.device(identifier: "iPhone13,2", isSimulator: false, os: "iOS 18.1")
        return DeviceReport(manifest: manifest, device: device, computeUnits: .cpuAndNeuralEngine, stats: stats,
                            created: Date(timeIntervalSince1970: 1_795_462_800))
    }

    func testEncodesContractKeys() throws {
        let data = try makeReport().encoded()
        let o = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        XCTAssertEqual(Set(o.keys), [
            "schema_version", "device", "compute_units", "model", "precision", "input_size", "artifact_sha256",
            "method", "rounds_ms", "stats_ms", "created",
        ])
        XCTAssertEqual(Set((o["device"] as? [String: Any] ?? [:]).keys), ["name", "identifier", "os"])
        XCTAssertEqual(Set((o["method"] as? [String: Any] ?? [:]).keys),
                       ["name", "warmup", "rounds", "inferences_per_round", "trim_low", "trim_high"])
        XCTAssertEqual(Set((o["stats_ms"] as? [String: Any] ?? [:]).keys), ["median", "mean", "p90", "min", "max", "std"])
        XCTAssertEqual(o["schema_version"] as? Int, 1)
        XCTAssertEqual(o["compute_units"] as? String, "cpuAndNeuralEngine")
        XCTAssertEqual(o["model"] as? String, "mobilevit_xxs")
        XCTAssertEqual(o["precision"] as? String, "fp16")
        XCTAssertEqual(o["input_size"] as? [Int], [256, 256])
        XCTAssertEqual(o["artifact_sha256"] as? String, "3f7a0c1e9b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e")
        XCTAssertEqual((o["device"] as? [String: Any])?["name"] as? String, "iPhone 12")
        XCTAssertEqual((o["method"] as? [String: Any])?["name"] as? String, "modelbench")
        XCTAssertEqual(o["rounds_ms"] as? [Double], [7.2, 7, 7.1333])
        XCTAssertEqual(o["created"] as? String, "2026-11-23T19:40:00Z")
    }

    func testEncodingIsStableAndRoundTrips() throws {
        let r = try makeReport()
        XCTAssertEqual(try r.encoded(), try r.encoded())
        XCTAssertEqual(try DeviceReport.decode(from: r.encoded()), r)
        XCTAssertEqual(r.suggestedFileName, "device_report_mobilevit_xxs_iPhone13-2_cpuAndNeuralEngine.json")
    }

    func testStatsAreReproducibleFromRounds() throws {
        let r = try makeReport()
        // The Python reader recomputes stats_ms from rounds_ms and rejects a mismatch.
        XCTAssertEqual(SummaryStats(of: r.roundsMs), r.statsMs)
        let decoded = try DeviceReport.decode(from: r.encoded())
        XCTAssertEqual(SummaryStats(of: decoded.roundsMs), decoded.statsMs, "exact after a JSON round trip")
    }

    func testComputeUnitNames() {
        XCTAssertEqual(ComputeUnits.allCases.map(\.rawValue), ["all", "cpuAndNeuralEngine", "cpuAndGPU", "cpuOnly"])
    }

    func testDeviceCatalog() {
        XCTAssertEqual(DeviceCatalog.device(identifier: "iPhone13,2", isSimulator: false, os: "iOS 18").name, "iPhone 12")
        XCTAssertEqual(DeviceCatalog.device(identifier: "iPhone99,9", isSimulator: false, os: "iOS 30").name, "iPhone99,9")
        let sim = DeviceCatalog.device(identifier: "arm64", isSimulator: true, os: "iOS 18")
        XCTAssertFalse(sim.name.contains("iPhone"), "a simulator run must never pass for an iPhone")
        XCTAssertEqual(sim.identifier, "simulator")
    }
}
