#!/usr/bin/env bash
# Make a compressed disk image with Deskbridge.app and a link to /Applications,
# so that a person installs by dragging the app onto the link.
# Usage: installer/macos/make_dmg.sh dist/Deskbridge.app dist/Deskbridge-0.1.0.dmg
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 APP_BUNDLE OUTPUT_DMG" >&2
    exit 2
fi
app=$1
dmg=$2
if [ ! -d "$app/Contents/MacOS" ]; then
    echo "make_dmg: $app is not an app bundle (no Contents/MacOS)" >&2
    exit 1
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
# ditto keeps symlinks, extended attributes and code signatures.
ditto "$app" "$staging/$(basename "$app")"
ln -s /Applications "$staging/Applications"

rm -f "$dmg"
# ULMO (LZMA) needs macOS 10.15 or later, and Info.plist requires macOS 13.
hdiutil create -volname "Deskbridge" -srcfolder "$staging" -fs HFS+ -format ULMO -ov "$dmg"
hdiutil verify "$dmg"
echo "make_dmg: wrote $dmg"
