import Foundation

/// One ranked class.
public struct Prediction: Equatable, Sendable, Identifiable {
    public var index: Int
    public var label: String
    public var probability: Double
    public var id: Int { index }

    public init(index: Int, label: String, probability: Double) {
        self.index = index
        self.label = label
        self.probability = probability
    }
}

public enum ClassificationError: Error, Equatable, CustomStringConvertible, LocalizedError {
    case scoreCount(got: Int, labels: Int)
    case missingLabel(String)
    case nonFinite

    public var description: String {
        switch self {
        case .scoreCount(let got, let labels): return "model returned \(got) scores for \(labels) labels"
        case .missingLabel(let l): return "model output has no score for label \(l)"
        case .nonFinite: return "model output contains NaN or infinity"
        }
    }

    public var errorDescription: String? { description }
}

public enum Classification {
    /// Numerically stable softmax (subtracts the maximum first). Empty in, empty out.
    public static func softmax(_ logits: [Double]) -> [Double] {
        guard let m = logits.max() else { return [] }
        let e = logits.map { Foundation.exp($0 - m) }
        let z = e.reduce(0, +)
        return e.map { $0 / z }
    }

    /// Indices of the `k` largest scores, largest first; ties keep the lower index first.
    public static func topK(_ scores: [Double], k: Int) -> [Int] {
        guard k > 0 else { return [] }
        let order = scores.indices.sorted { a, b in
            scores[a] != scores[b] ? scores[a] > scores[b] : a < b
        }
        return Array(order.prefix(k))
    }

    /// Scores ordered like `labels`, from a Core ML classifier's dictionary output (label -> score).
    public static func scores(fromDictionary dict: [String: Double], labels: [String]) throws -> [Double] {
        guard dict.count == labels.count else { throw ClassificationError.scoreCount(got: dict.count, labels: labels.count) }
        return try labels.map { label in
            guard let v = dict[label] else { throw ClassificationError.missingLabel(label) }
            return v
        }
    }

    /// Probabilities from raw model output: softmax of logits, or the probabilities renormalised
    /// (fp16 outputs rarely sum to exactly 1).
    public static func probabilities(_ scores: [Double], kind: OutputKind) throws -> [Double] {
        guard scores.allSatisfy({ $0.isFinite }) else { throw ClassificationError.nonFinite }
        switch kind {
        case .logits:
            return softmax(scores)
        case .probabilities:
            let z = scores.reduce(0, +)
            return z > 0 ? scores.map { $0 / z } : scores
        }
    }

    /// The top-`k` predictions with their probabilities.
    public static func rank(_ scores: [Double], kind: OutputKind, labels: [String], k: Int = 5) throws -> [Prediction] {
        guard scores.count == labels.count else {
            throw ClassificationError.scoreCount(got: scores.count, labels: labels.count)
        }
        let p = try probabilities(scores, kind: kind)
        return topK(p, k: k).map { Prediction(index: $0, label: labels[$0], probability: p[$0]) }
    }
}
