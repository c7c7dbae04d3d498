import MobileViTKit
import SwiftUI

@MainActor
struct BenchmarkView: View {
    @EnvironmentObject private var store: ModelStore
    @StateObject private var runner = BenchmarkRunner()

    var body: some View {
        NavigationStack {
            Form {
                ModelSection()
                Section {
                    let m = runner.method
                    Text("Apple ModelBench method: \(m.warmup) warm-up inferences, then \(m.rounds) rounds of \(m.inferencesPerRound); each round drops its \(m.trimLow) fastest and \(m.trimHigh) slowest inferences and averages the rest. Input: a fixed synthetic image of the model's size.")
                        .font(.callout)
                        .foregroundStyle(.secondary)
                    if let cascade = store.cascade {
                        Text("Cascade: each of the \(cascade.spec.stages.count) stages is measured alone on a synthetic input (an image of its size, or features for a stage that continues from the previous one's); the report's top level is the \(cascade.spec.wholeModelDescription). Exit rates come from the manifest's threshold selection.")
                            .font(.callout)
                            .foregroundStyle(.secondary)
                    }
                    if runner.isRunning {
                        Button("Cancel", role: .cancel) { runner.cancel() }
                    } else {
                        Button {
                            if let classifier = store.classifier { runner.start(classifier: classifier, cascade: store.cascade) }
                        } label: {
                            Label("Run benchmark (\(store.computeUnits.displayName))", systemImage: "stopwatch")
                        }
                        .disabled(store.classifier == nil || store.isLoading)
                    }
                } header: {
                    Text("Benchmark")
                }
                switch runner.state {
                case .idle:
                    EmptyView()
                case .running(let progress, let stage):
                    Section {
                        ProgressView(value: progress.fraction) {
                            Text(progress.phase == .warmup ? "Warming up…" : "Round \(progress.round) of \(runner.method.rounds)")
                        }
                        if let stage {
                            Text("Measuring \(stage)").font(.footnote).foregroundStyle(.secondary)
                        }
                    }
                case .failed(let message):
                    Section { Text(message).foregroundStyle(.red) }
                case .finished(let report, let url, let cascade):
                    if let cascade {
                        Section("Cascade (threshold \(String(format: "%.3f", cascade.spec.threshold)))") {
                            ForEach(cascade.spec.stages.indices, id: \.self) { i in
                                LabeledContent(cascade.spec.stageDescription(i), value: cascade.stageSummary(i))
                            }
                            if let whole = cascade.wholeModelStats {
                                LabeledContent(cascade.spec.wholeModelDescription, value: String(format: "%.2f ms", whole.stats.mean))
                            }
                            if let mean = cascade.expectedLatencyMs {
                                row("Mean per image", mean)
                            } else {
                                Text("The manifest has no exit rates (threshold_selection), so no mean per image.")
                                    .font(.footnote).foregroundStyle(.secondary)
                            }
                        }
                    }
                    Section(resultTitle(report, cascade: cascade?.spec)) {
                        row("Median", report.statsMs.median)
                        row("Mean", report.statsMs.mean)
                        row("p90", report.statsMs.p90)
                        row("Min", report.statsMs.min)
                        row("Max", report.statsMs.max)
                        row("Std", report.statsMs.std)
                        LabeledContent("Compute units", value: report.computeUnits.displayName)
                        LabeledContent("Device", value: "\(report.device.name) · \(report.device.os)")
                    }
                    Section {
                        ShareLink(item: url) {
                            Label("Share device report", systemImage: "square.and.arrow.up")
                        }
                        Text(url.lastPathComponent).font(.footnote).foregroundStyle(.secondary)
                    } footer: {
                        Text("On the computer: python -m mobilevit_deploy.bench --device-report \(url.lastPathComponent) --device-only --report out.md")
                    }
                }
            }
            .navigationTitle("Benchmark")
            .onChange(of: store.computeUnits) {
                runner.cancel()
            }
        }
    }

    private func resultTitle(_ report: DeviceReport, cascade: CascadeSpec?) -> String {
        let rounds = "ms, over \(report.roundsMs.count) round means"
        guard let cascade else { return "Result (\(rounds))" }
        return "Whole model alone: \(cascade.wholeModelName) (\(rounds))"
    }

    private func row(_ name: LocalizedStringKey, _ value: Double) -> some View {
        LabeledContent(name, value: String(format: "%.3f", value))
    }
}
