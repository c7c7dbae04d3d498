#!/usr/bin/env bash
# Copy exported Core ML artifacts (<model>.mlpackage + <model>.mlpackage.json manifest) into the
# app target's Model/ folder, where Xcode compiles the .mlpackage into the app bundle.
#
#   ios_demo/scripts/install_model.sh [--keep] artifacts/mobilevit_xxs.mlpackage [more.mlpackage ...]
#
#   --keep   add to the models already installed (default: replace them)
#   MVKIT_MODEL_DIR overrides the destination (tests).
#
# Nothing about the model is written here: the app reads input size, labels and preprocessing
# from the model and its manifest at run time.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${MVKIT_MODEL_DIR:-$here/../MobileViTDemo/Model}"
keep=0
usage="usage: $(basename "$0") [--keep] <model>.mlpackage [...]   (from: python -m mobilevit_deploy.export --target coreml)"

packages=()
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        -*) echo "unknown option $arg" >&2; echo "$usage" >&2; exit 2 ;;
        *) packages+=("${arg%/}") ;;
    esac
done
[ ${#packages[@]} -gt 0 ] || { echo "$usage" >&2; exit 2; }

py="$(command -v python3 || command -v python || true)"
for pkg in "${packages[@]}"; do
    [ -d "$pkg" ] && [ "${pkg##*.}" = "mlpackage" ] || { echo "error: $pkg is not an .mlpackage directory" >&2; exit 1; }
    manifest="$pkg.json"
    [ -f "$manifest" ] || { echo "error: no manifest $manifest beside $pkg (export writes it)" >&2; exit 1; }
    if [ -n "$py" ]; then
        "$py" - "$manifest" "$(basename "$pkg")" <<'PY' || exit 1
import json, sys
path, name = sys.argv[1], sys.argv[2]
try:
    m = json.load(open(path))
except ValueError as e:
    sys.exit(f"error: {path} is not JSON: {e}")
problems = []
if m.get("schema_version") != 1:
    problems.append(f"schema_version {m.get('schema_version')!r} (the app reads 1)")
if m.get("target") != "coreml":
    problems.append(f"target {m.get('target')!r}, the app needs a coreml artifact")
if (m.get("artifact") or {}).get("file") != name:
    problems.append(f"artifact.file {(m.get('artifact') or {}).get('file')!r} does not name {name}")
if problems:
    sys.exit(f"error: {path}: " + "; ".join(problems))
PY
    fi
done

mkdir -p "$dest"
if [ "$keep" = 0 ]; then
    find "$dest" -mindepth 1 -maxdepth 1 ! -name .gitignore -exec rm -rf {} +
fi
for pkg in "${packages[@]}"; do
    name="$(basename "$pkg")"
    rm -rf "${dest:?}/$name" "$dest/$name.json"
    cp -R "$pkg" "$dest/$name"
    cp "$pkg.json" "$dest/$name.json"
    echo "installed $name (+ manifest) -> $dest"
done
echo "next: open ios_demo/MobileViTDemo.xcodeproj, pick your team under Signing & Capabilities, run on an iPhone"
