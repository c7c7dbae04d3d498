import MobileViTKit
import SwiftUI

@MainActor
struct ContentView: View {
    @EnvironmentObject private var store: ModelStore

    var body: some View {
        TabView {
            ClassifyView()
                .tabItem { Label("Classify", systemImage: "photo.on.rectangle") }
            BenchmarkView()
                .tabItem { Label("Benchmark", systemImage: "stopwatch") }
        }
    }
}

/// Model and compute-unit pickers plus the model's state; shared by both tabs.
@MainActor
struct ModelSection: View {
    @EnvironmentObject private var store: ModelStore

    var body: some View {
        Section("Model") {
            if store.models.isEmpty {
                Text("No Core ML model in the app bundle. Run `ios_demo/scripts/install_model.sh artifacts/<model>.mlpackage`, then build again.")
                    .font(.callout)
                    .foregroundStyle(.secondary)
            } else {
                if store.models.count > 1 {
                    Picker("Model", selection: $store.selectedID) {
                        ForEach(store.models) { model in
                            Text(model.title).tag(model.id)
                        }
                    }
                }
                Picker("Compute units", selection: $store.computeUnits) {
                    ForEach(ComputeUnits.allCases) { units in
                        Text(units.displayName).tag(units)
                    }
                }
                if let model = store.selected {
                    let m = model.manifest
                    LabeledContent("Model", value: m.model)
                    LabeledContent("Precision", value: m.reportPrecision)
                    LabeledContent("Input", value: "\(m.inputWidth) × \(m.inputHeight) \(m.input.colorLayout)")
                    LabeledContent("Classes", value: "\(m.labels.count)")
                    if let cascade = m.cascade {
                        Text("Cascade: \(cascade.summary)").font(.footnote).foregroundStyle(.secondary)
                    }
                }
                if store.isLoading {
                    HStack {
                        ProgressView()
                        Text("Loading model…").foregroundStyle(.secondary)
                    }
                } else if let error = store.loadError {
                    Text(error).foregroundStyle(.red).font(.callout)
                } else if let ms = store.loadMs, store.classifier != nil {
                    LabeledContent("Load time", value: String(format: "%.0f ms", ms))
                }
            }
            ForEach(store.problems, id: \.self) { problem in
                Text(problem).font(.footnote).foregroundStyle(.orange)
            }
        }
    }
}
