// swift-tools-version:5.9
// MobileViTKit: the platform-free core of the iOS demo (manifest decoding, preprocessing geometry,
// softmax/top-k, ModelBench statistics, device-report encoding), plus Core ML glue that only
// compiles where Core ML exists (`#if canImport(CoreML)`). Builds and tests on Linux with `swift test`.
// No outside dependencies, on purpose.
import PackageDescription

let package = Package(
    name: "MobileViTKit",
    platforms: [.iOS(.v17), .macOS(.v14)],
    products: [
        .library(name: "MobileViTKit", targets: ["MobileViTKit"]),
        .executable(name: "mvkit-report", targets: ["mvkit-report"]),
        .executable(name: "mvkit-manifest", targets: ["mvkit-manifest"]),
    ],
    targets: [
        .target(name: "MobileViTKit"),
        .executableTarget(name: "mvkit-report", dependencies: ["MobileViTKit"]),
        .executableTarget(name: "mvkit-manifest", dependencies: ["MobileViTKit"]),
        .testTarget(
            name: "MobileViTKitTests",
            dependencies: ["MobileViTKit"],
            resources: [.copy("Fixtures")]
        ),
    ]
)
