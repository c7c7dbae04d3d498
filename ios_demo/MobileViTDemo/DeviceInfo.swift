import MobileViTKit
import UIKit

enum DeviceInfo {
    /// This device as the report describes it; call on the main actor (UIDevice).
    @MainActor
    static func current() -> DeviceReport.Device {
        let os = "\(UIDevice.current.systemName) \(UIDevice.current.systemVersion)"
        #if targetEnvironment(simulator)
        let isSimulator = true
        #else
        let isSimulator = false
        #endif
        return DeviceCatalog.device(identifier: machineIdentifier(), isSimulator: isSimulator, os: os)
    }
}

extension UIImage {
    /// The pixels the way the photo is meant to be seen (EXIF orientation applied), as a CGImage.
    func uprightCGImage() -> CGImage? {
        if imageOrientation == .up, let cg = cgImage { return cg }
        let pixelSize = CGSize(width: size.width * scale, height: size.height * scale)
        let format = UIGraphicsImageRendererFormat.default()
        format.scale = 1
        format.preferredRange = .standard
        let renderer = UIGraphicsImageRenderer(size: pixelSize, format: format)
        return renderer.image { _ in draw(in: CGRect(origin: .zero, size: pixelSize)) }.cgImage
    }
}
