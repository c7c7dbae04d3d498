#!/usr/bin/env bash
# Build and test ios_demo/MobileViTKit with `swift test` when a Swift toolchain is present
# (on PATH or at /opt/swift); otherwise say plainly that it is skipped and exit 0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
swift_bin="$(command -v swift || true)"
if [ -z "$swift_bin" ] && [ -x /opt/swift/usr/bin/swift ]; then swift_bin=/opt/swift/usr/bin/swift; fi
if [ -z "$swift_bin" ]; then
    echo "SKIPPED: swift test for ios_demo/MobileViTKit — no Swift toolchain (not on PATH, not at /opt/swift/usr/bin/swift)"
    exit 0
fi
echo "swift test for ios_demo/MobileViTKit with $("$swift_bin" --version 2>&1 | head -n 1)"
exec "$swift_bin" test --package-path "$here/../MobileViTKit" "$@"
