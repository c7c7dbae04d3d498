import Combine
import CoreML
import Foundation
import MobileViTKit

/// A Core ML model shipped in the app bundle together with its manifest.
struct BundledModel: Identifiable, Equatable {
    let manifest: Manifest
    let manifestURL: URL
    /// `<stem>.mlmodelc` (compiled by Xcode) or `<stem>.mlpackage` (compiled at runtime).
    let modelURL: URL

    var id: String { manifest.artifactStem }
    var title: String { "\(manifest.model) · \(manifest.reportPrecision)" }
}

/// Finds the bundled models, loads the selected one with the selected compute units.
@MainActor
final class ModelStore: ObservableObject {
    @Published private(set) var models: [BundledModel] = []
    /// Manifests that could not be used, with the reason.
    @Published private(set) var problems: [String] = []
    @Published var selectedID: String = "" {
        didSet { if oldValue != selectedID { scheduleReload() } }
    }
    @Published var computeUnits: ComputeUnits = .all {
        didSet { if oldValue != computeUnits { scheduleReload() } }
    }
    /// The model at the manifest's input size (for a cascade: the whole model alone — a size
    /// cascade's last stage, a depth cascade's `whole_model` function).
    @Published private(set) var classifier: CoreMLClassifier?
    /// Set when the manifest has a `cascade` section: every function of the multi-function model.
    @Published private(set) var cascade: CoreMLCascade?
    @Published private(set) var isLoading = false
    @Published private(set) var loadError: String?
    @Published private(set) var loadMs: Double?

    private var compiled: [String: URL] = [:]
    private var generation = 0

    init(bundle: Bundle = .main) {
        let found = ModelStore.discover(in: bundle)
        models = found.models
        problems = found.problems
        selectedID = found.models.first?.id ?? ""
        scheduleReload()
    }

    var selected: BundledModel? { models.first { $0.id == selectedID } }

    private func scheduleReload() {
        Task { await reload() }
    }

    func reload() async {
        generation += 1
        let current = generation
        guard let model = selected else {
            classifier = nil
            cascade = nil
            isLoading = false
            return
        }
        isLoading = true
        loadError = nil
        let start = Date()
        do {
            let url = try await compiledURL(for: model)
            if model.manifest.cascade != nil {
                // One function per stage in one multi-function model: MLModelConfiguration.functionName.
                guard #available(iOS 18.0, *) else {
                    throw CascadeError.unsupportedOS("This cascade model (a multi-function Core ML model) needs iOS 18 or newer.")
                }
                let loaded = try await CoreMLCascade.load(modelURL: url, manifest: model.manifest, computeUnits: computeUnits)
                guard current == generation else { return }
                cascade = loaded
                classifier = loaded.wholeModel
            } else {
                let loaded = try await CoreMLClassifier.load(modelURL: url, manifest: model.manifest, computeUnits: computeUnits)
                guard current == generation else { return }
                cascade = nil
                classifier = loaded
            }
            loadMs = Date().timeIntervalSince(start) * 1000
        } catch {
            guard current == generation else { return }
            classifier = nil
            cascade = nil
            loadError = error.localizedDescription
        }
        isLoading = false
    }

    /// Xcode compiles an `.mlpackage` in the app target to `.mlmodelc`; if only the package is in the
    /// bundle (e.g. added as a folder resource), compile it once per launch.
    private func compiledURL(for model: BundledModel) async throws -> URL {
        if model.modelURL.pathExtension == "mlmodelc" { return model.modelURL }
        if let url = compiled[model.id] { return url }
        let url = try await MLModel.compileModel(at: model.modelURL)
        compiled[model.id] = url
        return url
    }

    /// Every `<stem>.mlpackage.json` manifest in the bundle with a Core ML model of the same stem.
    nonisolated static func discover(in bundle: Bundle) -> (models: [BundledModel], problems: [String]) {
        var models: [BundledModel] = []
        var problems: [String] = []
        // Xcode flattens the synchronized Model/ folder into the bundle root; look in both places.
        let folders: [String?] = [nil, "Model"]
        var manifests: [URL] = []
        for folder in folders {
            let jsons: [URL] = bundle.urls(forResourcesWithExtension: "json", subdirectory: folder) ?? []
            for url in jsons where ModelFiles.stem(ofManifest: url.lastPathComponent) != nil {
                manifests.append(url)
            }
        }
        manifests.sort { $0.lastPathComponent < $1.lastPathComponent }
        for url in manifests {
            let name = url.lastPathComponent
            do {
                let manifest = try Manifest.load(contentsOf: url)
                guard manifest.target == "coreml" else {
                    problems.append("\(name): target \(manifest.target), not coreml")
                    continue
                }
                let stem = manifest.artifactStem
                var candidates: [URL] = []
                for folder in folders {
                    for ext in ["mlmodelc", "mlpackage"] {
                        if let found = bundle.url(forResource: stem, withExtension: ext, subdirectory: folder) {
                            candidates.append(found)
                        }
                    }
                }
                guard let modelURL = candidates.first else {
                    problems.append("\(name): no \(stem).mlmodelc or \(stem).mlpackage in the app bundle")
                    continue
                }
                if !models.contains(where: { $0.id == manifest.artifactStem }) {
                    models.append(BundledModel(manifest: manifest, manifestURL: url, modelURL: modelURL))
                }
            } catch {
                problems.append("\(name): \(error.localizedDescription)")
            }
        }
        return (models, problems)
    }
}
