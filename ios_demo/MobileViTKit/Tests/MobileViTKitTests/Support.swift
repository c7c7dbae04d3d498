import Foundation
import XCTest

enum Fixtures {
    static func url(_ name: String) throws -> URL {
        try XCTUnwrap(Bundle.module.url(forResource: name, withExtension: "json", subdirectory: "Fixtures"),
                      "fixture \(name).json missing from the test bundle")
    }

    static func data(_ name: String) throws -> Data { try Data(contentsOf: url(name)) }

    /// The fixture as a mutable JSON object, to derive broken variants from.
    static func object(_ name: String) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: data(name)) as? [String: Any])
    }

    static func data(of object: [String: Any]) throws -> Data {
        try JSONSerialization.data(withJSONObject: object)
    }
}

func XCTAssertClose(_ a: Double, _ b: Double, tol: Double = 1e-9, _ message: String = "",
                    file: StaticString = #filePath, line: UInt = #line) {
    XCTAssert(abs(a - b) <= tol, "\(a) != \(b) (tol \(tol)) \(message)", file: file, line: line)
}
