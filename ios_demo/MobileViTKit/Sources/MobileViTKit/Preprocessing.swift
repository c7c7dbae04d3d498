import Foundation

/// A rectangle in image pixel coordinates, origin at the top-left corner (CGImage convention).
public struct PixelRect: Equatable, Sendable, CustomStringConvertible {
    public var x: Double
    public var y: Double
    public var width: Double
    public var height: Double

    public init(x: Double, y: Double, width: Double, height: Double) {
        self.x = x
        self.y = y
        self.width = width
        self.height = height
    }

    public var description: String { "(\(x), \(y), \(width) x \(height))" }
}

/// How a photo becomes the model's input, entirely from the manifest (never hard-coded):
/// the eval transform of `mobilevit_deploy.data.eval_transform` — resize the shorter side to
/// `H / crop_pct`, centre-crop `H x W` — and the normalisation.
///
/// For `kind == image` (Core ML) the normalisation `y = scale * pixel + bias` is baked into the
/// model, so the app only crops and resizes; for `kind == tensor` the caller normalises with
/// `(pixel / 255 - mean) / std` (`normalizedTensor`).
public struct Preprocessing: Equatable, Sendable {
    public var width: Int
    public var height: Int
    public var kind: InputKind
    public var colorLayout: String
    public var mean: [Double]
    public var std: [Double]
    public var scale: Double
    public var bias: [Double]
    public var cropPct: Double
    public var interpolation: String

    public init(manifest: Manifest) {
        let input = manifest.input
        width = manifest.inputWidth
        height = manifest.inputHeight
        kind = manifest.inputKind
        colorLayout = input.colorLayout
        mean = input.mean
        std = input.std
        let derived = Preprocessing.scaleBias(mean: input.mean, std: input.std)
        scale = input.scale ?? derived.scale
        bias = input.bias ?? derived.bias
        cropPct = input.cropPct
        interpolation = input.interpolation
    }

    /// Core ML ImageType form of mean/std for pixels in 0...255 (same rule as
    /// `DeployCfg.scale_bias`: one scalar scale, per-channel std folded to its mean).
    public static func scaleBias(mean: [Double], std: [Double]) -> (scale: Double, bias: [Double]) {
        let s = std.reduce(0, +) / Double(std.count)
        return (1.0 / (255.0 * s), mean.map { -$0 / s })
    }

    /// The region of a `imageWidth x imageHeight` photo that the eval transform keeps, in the
    /// photo's own pixel coordinates. Cropping this region and scaling it to `width x height`
    /// reproduces `eval_transform` (up to the interpolation filter).
    public func cropRect(imageWidth iw: Int, imageHeight ih: Int) -> PixelRect {
        precondition(iw > 0 && ih > 0, "image size must be positive")
        let h = height, w = width
        // Same integer arithmetic as the Python transform.
        let short = Int((Double(min(h, w)) / cropPct).rounded(.toNearestOrEven))
        let scale = Double(short) / Double(min(iw, ih))
        let nw = max(w, Int((Double(iw) * scale).rounded(.toNearestOrEven)))
        let nh = max(h, Int((Double(ih) * scale).rounded(.toNearestOrEven)))
        let left = (nw - w) / 2, top = (nh - h) / 2
        let sx = Double(iw) / Double(nw), sy = Double(ih) / Double(nh)
        return PixelRect(x: Double(left) * sx, y: Double(top) * sy, width: Double(w) * sx, height: Double(h) * sy)
    }

    /// A float32 CHW tensor (RGB or BGR as the manifest says) from interleaved 8-bit RGBA pixels
    /// that are already `width x height`, normalised as `(p / 255 - mean) / std`.
    public func normalizedTensor(rgba: [UInt8]) -> [Float] {
        precondition(rgba.count == width * height * 4, "expected \(width)x\(height) RGBA pixels")
        let plane = width * height
        var out = [Float](repeating: 0, count: 3 * plane)
        let order = colorLayout == "BGR" ? [2, 1, 0] : [0, 1, 2]
        for (c, src) in order.enumerated() {
            let m = mean[src], s = std[src]
            for i in 0..<plane {
                let p = Double(rgba[i * 4 + src]) / 255.0
                out[c * plane + i] = Float((p - m) / s)
            }
        }
        return out
    }

    /// What the model sees for one 8-bit channel value once `scale`/`bias` are applied (image kind).
    public func modelValue(pixel: UInt8, channel: Int) -> Double {
        scale * Double(pixel) + bias[channel]
    }
}
