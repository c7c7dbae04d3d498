import Combine
import Foundation
import MobileViTKit

/// Runs the ModelBench loop off the main thread and turns the result into a device report file.
@MainActor
final class BenchmarkRunner: ObservableObject {
    enum State {
        case idle
        /// The stage being measured, for a cascade.
        case running(BenchmarkProgress, stage: String?)
        /// The cascade's per-stage results, for a cascade model.
        case finished(DeviceReport, URL, CascadeBenchmark?)
        case failed(String)
    }

    @Published private(set) var state: State = .idle
    let method: BenchmarkMethod = .modelBench
    private var task: Task<Void, Never>?
    /// The run whose results may update `state` (a cancelled run finishing late must not).
    private var currentRun = UUID()

    var isRunning: Bool {
        if case .running = state { return true }
        return false
    }

    /// A cascade is measured stage by stage (then a depth cascade's whole model); its report's top
    /// level is the whole model alone's (`spec.wholeModelName`).
    func start(classifier: CoreMLClassifier, cascade: CoreMLCascade? = nil) {
        task?.cancel()
        let method = self.method
        let device = DeviceInfo.current()
        let run = UUID()
        currentRun = run
        let total = method.totalInferences * (cascade?.spec.benchmarkCount ?? 1)
        state = .running(BenchmarkProgress(completed: 0, total: total, phase: .warmup, round: 0), stage: nil)
        // The task keeps the runner (a @StateObject, alive anyway) until the benchmark ends.
        task = Task.detached(priority: .userInitiated) { [self] in
            let outcome: State
            do {
                let report: DeviceReport
                var cascadeBench: CascadeBenchmark?
                if let cascade {
                    let bench = try cascade.benchmark(
                        method: method,
                        isCancelled: { Task.isCancelled },
                        progress: { stage, progress in
                            let label = cascade.spec.benchmarkDescription(stage)
                            Task { @MainActor in
                                if self.currentRun == run { self.state = .running(progress, stage: label) }
                            }
                        })
                    report = DeviceReport(manifest: cascade.manifest, device: device,
                                          computeUnits: cascade.computeUnits, cascade: bench)
                    cascadeBench = bench
                } else {
                    let input = try classifier.syntheticInput()
                    let stats = try classifier.benchmark(
                        input: input,
                        method: method,
                        isCancelled: { Task.isCancelled },
                        progress: { progress in
                            Task { @MainActor in
                                if self.currentRun == run { self.state = .running(progress, stage: nil) }
                            }
                        })
                    report = DeviceReport(manifest: classifier.manifest, device: device,
                                          computeUnits: classifier.computeUnits, stats: stats)
                }
                let url = FileManager.default.temporaryDirectory.appendingPathComponent(report.suggestedFileName)
                try report.encoded().write(to: url, options: .atomic)
                outcome = .finished(report, url, cascadeBench)
            } catch BenchmarkError.cancelled {
                outcome = .idle
            } catch {
                outcome = .failed(error.localizedDescription)
            }
            await MainActor.run {
                if self.currentRun == run { self.state = outcome }
            }
        }
    }

    func cancel() {
        task?.cancel()
    }
}
