#!/usr/bin/env bash
# Sign Deskbridge.app (inside out, with the hardened runtime) or a .dmg with a
# Developer ID certificate from the keychain.
#
# MACOS_SIGN_IDENTITY: the certificate's name, for example
#   "Developer ID Application: Example Ltd (TEAMID1234)". Without it the
#   script prints that it skips signing and exits 0, so unsigned builds work.
# MACOS_KEYCHAIN: optional keychain file that contains the certificate.
#
# Usage: installer/macos/sign.sh dist/Deskbridge.app | dist/Deskbridge-0.1.0.dmg
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 APP_BUNDLE_OR_DMG" >&2
    exit 2
fi
target=$1
if [ -z "${MACOS_SIGN_IDENTITY:-}" ]; then
    echo "sign: MACOS_SIGN_IDENTITY is not set; skipping code signing of $target (the build stays unsigned)"
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
options=(--force --timestamp --sign "$MACOS_SIGN_IDENTITY")
if [ -n "${MACOS_KEYCHAIN:-}" ]; then
    options+=(--keychain "$MACOS_KEYCHAIN")
fi

if [[ "$target" == *.dmg ]]; then
    codesign "${options[@]}" "$target"
    codesign --verify --verbose=2 "$target"
    exit 0
fi

runtime=(--options runtime --entitlements "$here/entitlements.plist")
# Nested code first: every Mach-O library and extension module, then the
# executables, then the bundle. --deep is not used because Apple advises
# against it for signing.
while IFS= read -r -d '' file; do
    if file -b "$file" | grep -q "Mach-O"; then
        codesign "${options[@]}" "${runtime[@]}" "$file"
    fi
done < <(find "$target/Contents" -type f ! -path "*/Contents/MacOS/*" -print0)
for executable in "$target"/Contents/MacOS/*; do
    codesign "${options[@]}" "${runtime[@]}" "$executable"
done
codesign "${options[@]}" "${runtime[@]}" "$target"
codesign --verify --strict --deep --verbose=2 "$target"
echo "sign: signed $target as $MACOS_SIGN_IDENTITY"
