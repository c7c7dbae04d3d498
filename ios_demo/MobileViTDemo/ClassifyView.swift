import MobileViTKit
import PhotosUI
import SwiftUI

@MainActor
struct ClassifyView: View {
    @EnvironmentObject private var store: ModelStore
    @State private var pickerItem: PhotosPickerItem?
    @State private var showCamera = false
    @State private var photo: UIImage?
    @State private var result: ClassificationResult?
    @State private var cascadeResult: CascadeResult?
    @State private var resultUnits: ComputeUnits?
    @State private var error: String?
    @State private var isRunning = false

    var body: some View {
        NavigationStack {
            Form {
                ModelSection()
                Section("Photo") {
                    PhotosPicker(selection: $pickerItem, matching: .images) {
                        Label("Choose from library", systemImage: "photo")
                    }
                    Button {
                        showCamera = true
                    } label: {
                        Label("Take a photo", systemImage: "camera")
                    }
                    .disabled(!CameraPicker.isAvailable)
                    if let photo {
                        Image(uiImage: photo)
                            .resizable()
                            .scaledToFit()
                            .frame(maxHeight: 280)
                            .frame(maxWidth: .infinity)
                    }
                }
                if isRunning {
                    Section { ProgressView("Classifying…") }
                }
                if let error {
                    Section { Text(error).foregroundStyle(.red) }
                }
                if let cascadeResult {
                    predictionsSection(cascadeResult.predictions)
                    Section("Cascade") {
                        LabeledContent("Answered by", value: cascadeResult.answerDescription)
                        LabeledContent("Its latency", value: String(format: "%.2f ms", cascadeResult.answeringRun.inferenceMs))
                        ForEach(cascadeResult.runs) { run in
                            LabeledContent("Stage \(run.index + 1): \(run.name)",
                                           value: String(format: "%.2f ms · max p %.2f", run.inferenceMs, run.maxProbability))
                        }
                        LabeledContent("Inference, all stages", value: String(format: "%.2f ms", cascadeResult.inferenceMs))
                        LabeledContent("Preprocessing", value: String(format: "%.2f ms", cascadeResult.preprocessingMs))
                        if let resultUnits {
                            LabeledContent("Compute units", value: resultUnits.displayName)
                        }
                    }
                }
                if let result {
                    predictionsSection(result.predictions)
                    Section("Latency") {
                        LabeledContent("Inference", value: String(format: "%.2f ms", result.inferenceMs))
                        LabeledContent("Preprocessing", value: String(format: "%.2f ms", result.preprocessingMs))
                        if let resultUnits {
                            LabeledContent("Compute units", value: resultUnits.displayName)
                        }
                    }
                }
            }
            .navigationTitle("Classify")
            .sheet(isPresented: $showCamera) {
                CameraPicker(isPresented: $showCamera) { image in
                    photo = image
                    Task { await classify() }
                }
                .ignoresSafeArea()
            }
            .onChange(of: pickerItem) {
                Task { await loadPickedPhoto() }
            }
            .onChange(of: store.classifier.map(ObjectIdentifier.init)) {
                // The model was reloaded (other compute units or model): classify the photo again.
                Task { await classify() }
            }
        }
    }

    private func predictionsSection(_ predictions: [Prediction]) -> some View {
        Section("Top \(predictions.count)") {
            ForEach(predictions) { p in
                VStack(alignment: .leading, spacing: 4) {
                    HStack {
                        Text(p.label)
                        Spacer()
                        Text(p.probability, format: .percent.precision(.fractionLength(1)))
                            .monospacedDigit()
                    }
                    ProgressView(value: p.probability)
                }
            }
        }
    }

    @MainActor
    private func loadPickedPhoto() async {
        guard let item = pickerItem else { return }
        do {
            guard let data = try await item.loadTransferable(type: Data.self), let image = UIImage(data: data) else {
                error = "Could not read that photo."
                return
            }
            photo = image
            await classify()
        } catch {
            self.error = error.localizedDescription
        }
    }

    @MainActor
    private func classify() async {
        guard let photo, let classifier = store.classifier else { return }
        let cascade = store.cascade
        guard let cgImage = photo.uprightCGImage() else {
            error = "Could not decode the photo."
            return
        }
        isRunning = true
        error = nil
        let units = classifier.computeUnits
        let outcome = await Task.detached(priority: .userInitiated) {
            Result<(ClassificationResult?, CascadeResult?), Error> {
                if let cascade { return (nil, try cascade.classify(cgImage: cgImage, topK: 5)) }
                return (try classifier.classify(cgImage: cgImage, topK: 5), nil)
            }
        }.value
        isRunning = false
        switch outcome {
        case .success(let (single, cascaded)):
            result = single
            cascadeResult = cascaded
            resultUnits = units
        case .failure(let e):
            result = nil
            cascadeResult = nil
            error = e.localizedDescription
        }
    }
}
