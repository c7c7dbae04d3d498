import Foundation
import XCTest
@testable import MobileViTKit

final class PreprocessingTests: XCTestCase {
    func testFromManifest() throws {
        let p = try Manifest.load(contentsOf: Fixtures.url("manifest")).preprocessing
        XCTAssertEqual(p.width, 256)
        XCTAssertEqual(p.height, 256)
        XCTAssertEqual(p.kind, .image)
        XCTAssertClose(p.scale, 1.0 / 255.0)
        XCTAssertEqual(p.bias, [0, 0, 0])
        XCTAssertClose(p.modelValue(pixel: 255, channel: 0), 1.0)
    }

    func testScaleBiasDerivedLikeDeployCfg() throws {
        // DeployCfg.scale_bias for ImageNet mean/std: s = mean(std); scale = 1/(255 s); bias = -mean/s.
        let p = try Manifest.load(contentsOf: Fixtures.url("manifest_int8_nonsquare")).preprocessing
        let s = (0.229 + 0.224 + 0.225) / 3
        XCTAssertClose(p.scale, 1 / (255 * s))
        XCTAssertClose(p.bias[0], -0.485 / s)
        XCTAssertClose(p.bias[2], -0.406 / s)
    }

    /// Expected values from mobilevit_deploy.data.eval_transform's arithmetic (computed in Python).
    func testCropRectMatchesEvalTransform() throws {
        let square = try Manifest.load(contentsOf: Fixtures.url("manifest")).preprocessing  // 256x256, 0.9
        func check(_ p: Preprocessing, _ iw: Int, _ ih: Int, _ e: [Double], line: UInt = #line) {
            let r = p.cropRect(imageWidth: iw, imageHeight: ih)
            for (got, want) in zip([r.x, r.y, r.width, r.height], e) {
                XCTAssertClose(got, want, tol: 1e-9, "\(iw)x\(ih) -> \(r)", line: line)
            }
        }
        check(square, 640, 480, [103.00791556728232, 23.661971830985916, 432.29551451187336, 432.67605633802816])
        check(square, 480, 640, [23.661971830985916, 103.00791556728232, 432.67605633802816, 432.29551451187336])
        check(square, 100, 3000, [4.929577464788732, 1454.9295774647887, 90.14084507042253, 90.14084507042253])
        let nonSquare = try Manifest.load(contentsOf: Fixtures.url("manifest_int8_nonsquare")).preprocessing  // 160x224
        check(nonSquare, 500, 375, [20.491803278688522, 22.540983606557376, 459.0163934426229, 327.86885245901635])
        var full = square
        full.cropPct = 1.0
        check(full, 256, 256, [0, 0, 256, 256])
    }

    func testNormalizedTensorIsCHWAndNormalised() throws {
        var p = try Manifest.load(contentsOf: Fixtures.url("manifest_int8_nonsquare")).preprocessing
        p.width = 2
        p.height = 1
        // two pixels: pure red, mid grey
        let rgba: [UInt8] = [255, 0, 0, 255, 128, 128, 128, 255]
        let t = p.normalizedTensor(rgba: rgba)
        XCTAssertEqual(t.count, 6)
        XCTAssertClose(Double(t[0]), (1.0 - 0.485) / 0.229, tol: 1e-5)        // R of pixel 0
        XCTAssertClose(Double(t[1]), (128.0 / 255 - 0.485) / 0.229, tol: 1e-5) // R of pixel 1
        XCTAssertClose(Double(t[2]), (0.0 - 0.456) / 0.224, tol: 1e-5)        // G of pixel 0
        XCTAssertClose(Double(t[5]), (128.0 / 255 - 0.406) / 0.225, tol: 1e-5) // B of pixel 1
        p.colorLayout = "BGR"
        let b = p.normalizedTensor(rgba: rgba)
        XCTAssertClose(Double(b[0]), (0.0 - 0.406) / 0.225, tol: 1e-5, "BGR puts blue first")
    }
}
