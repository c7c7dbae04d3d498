import Combine
import Foundation
import MobileViTKit

/// Runs the ModelBench loop off the main thread and turns the result into a device report file.
@MainActor
final class BenchmarkRunner: ObservableObject {
    enum State {
        case idle
        case running(BenchmarkProgress)
        case finished(DeviceReport, URL)
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

    func start(classifier: CoreMLClassifier) {
        task?.cancel()
        let method = self.method
        let device = DeviceInfo.current()
        let run = UUID()
        currentRun = run
        state = .running(BenchmarkProgress(completed: 0, total: method.totalInferences, phase: .warmup, round: 0))
        // The task keeps the runner (a @StateObject, alive anyway) until the benchmark ends.
        task = Task.detached(priority: .userInitiated) { [self] in
            let outcome: State
            do {
                let input = try classifier.syntheticInput()
                let stats = try classifier.benchmark(
                    input: input,
                    method: method,
                    isCancelled: { Task.isCancelled },
                    progress: { progress in
                        Task { @MainActor in
                            if self.currentRun == run { self.state = .running(progress) }
                        }
                    })
                let report = DeviceReport(manifest: classifier.manifest, device: device,
                                          computeUnits: classifier.computeUnits, stats: stats)
                let url = FileManager.default.temporaryDirectory.appendingPathComponent(report.suggestedFileName)
                try report.encoded().write(to: url, options: .atomic)
                outcome = .finished(report, url)
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
