import Foundation
import XCTest
@testable import MobileViTKit

final class ClassificationTests: XCTestCase {
    func testSoftmaxIsStableAndNormalised() {
        let p = Classification.softmax([1000, 1001, 1002])
        XCTAssertTrue(p.allSatisfy { $0.isFinite })
        XCTAssertClose(p.reduce(0, +), 1)
        // softmax is shift invariant
        let q = Classification.softmax([0, 1, 2])
        for (a, b) in zip(p, q) { XCTAssertClose(a, b, tol: 1e-12) }
        XCTAssertClose(q[2], exp(2) / (1 + exp(1) + exp(2)))
        let tiny = Classification.softmax([-1e4, 0])
        XCTAssertEqual(tiny[1], 1)
        XCTAssertEqual(Classification.softmax([]), [])
    }

    func testTopKOrderAndTies() {
        XCTAssertEqual(Classification.topK([0.1, 0.5, 0.2, 0.5, 0.0], k: 3), [1, 3, 2])
        XCTAssertEqual(Classification.topK([3, 1], k: 5), [0, 1], "k larger than the classes")
        XCTAssertEqual(Classification.topK([3, 1], k: 0), [])
    }

    func testRankLogits() throws {
        let labels = ["a", "b", "c", "d", "e", "f"]
        let r = try Classification.rank([0, 5, 1, 4, 2, 3], kind: .logits, labels: labels, k: 5)
        XCTAssertEqual(r.map(\.label), ["b", "d", "f", "e", "c"])
        XCTAssertClose(r[0].probability, exp(5) / [0.0, 5, 1, 4, 2, 3].map { exp($0) }.reduce(0, +))
        XCTAssertThrowsError(try Classification.rank([1, 2], kind: .logits, labels: labels))
    }

    func testProbabilitiesAreRenormalisedNotSoftmaxed() throws {
        let p = try Classification.probabilities([0.2, 0.6, 0.2002], kind: .probabilities)
        XCTAssertClose(p.reduce(0, +), 1)
        XCTAssertClose(p[1], 0.6 / 1.0002)
        XCTAssertThrowsError(try Classification.probabilities([0.1, .nan], kind: .probabilities))
    }

    func testScoresFromClassifierDictionary() throws {
        let labels = ["cat", "dog", "ship"]
        let s = try Classification.scores(fromDictionary: ["ship": 3, "cat": 1, "dog": 2], labels: labels)
        XCTAssertEqual(s, [1, 2, 3])
        XCTAssertThrowsError(try Classification.scores(fromDictionary: ["cat": 1, "dog": 2, "car": 3], labels: labels)) {
            XCTAssertEqual($0 as? ClassificationError, .missingLabel("ship"))
        }
        XCTAssertThrowsError(try Classification.scores(fromDictionary: ["cat": 1], labels: labels))
    }
}
