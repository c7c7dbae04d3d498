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
                    if runner.isRunning {
                        Button("Cancel", role: .cancel) { runner.cancel() }
                    } else {
                        Button {
                            if let classifier = store.classifier { runner.start(classifier: classifier) }
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
                case .running(let progress):
                    Section {
                        ProgressView(value: progress.fraction) {
                            Text(progress.phase == .warmup ? "Warming up…" : "Round \(progress.round) of \(runner.method.rounds)")
                        }
                    }
                case .failed(let message):
                    Section { Text(message).foregroundStyle(.red) }
                case .finished(let report, let url):
                    Section("Result (ms, over \(report.roundsMs.count) round means)") {
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

    private func row(_ name: LocalizedStringKey, _ value: Double) -> some View {
        LabeledContent(name, value: String(format: "%.3f", value))
    }
}
