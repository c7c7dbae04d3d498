import SwiftUI

@main
@MainActor
struct MobileViTDemoApp: App {
    @StateObject private var store = ModelStore()

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environmentObject(store)
        }
    }
}
