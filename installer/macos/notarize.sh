#!/usr/bin/env bash
# Notarize a signed .dmg with Apple's notary service and staple the ticket to it.
#
# Either MACOS_NOTARY_PROFILE (a profile saved with `xcrun notarytool
# store-credentials`) or all of MACOS_NOTARY_APPLE_ID, MACOS_NOTARY_TEAM_ID
# and MACOS_NOTARY_PASSWORD (an app-specific password) must be set. Without
# them, or without MACOS_SIGN_IDENTITY (Apple notarizes signed code only), the
# script prints that it skips notarization and exits 0.
#
# Usage: installer/macos/notarize.sh dist/Deskbridge-0.1.0.dmg
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DMG" >&2
    exit 2
fi
dmg=$1
if [ -z "${MACOS_SIGN_IDENTITY:-}" ]; then
    echo "notarize: MACOS_SIGN_IDENTITY is not set, so $dmg is unsigned; skipping notarization"
    exit 0
fi
if [ -n "${MACOS_NOTARY_PROFILE:-}" ]; then
    credentials=(--keychain-profile "$MACOS_NOTARY_PROFILE")
elif [ -n "${MACOS_NOTARY_APPLE_ID:-}" ] && [ -n "${MACOS_NOTARY_TEAM_ID:-}" ] && [ -n "${MACOS_NOTARY_PASSWORD:-}" ]; then
    credentials=(--apple-id "$MACOS_NOTARY_APPLE_ID" --team-id "$MACOS_NOTARY_TEAM_ID" --password "$MACOS_NOTARY_PASSWORD")
else
    echo "notarize: set MACOS_NOTARY_PROFILE, or MACOS_NOTARY_APPLE_ID, MACOS_NOTARY_TEAM_ID and MACOS_NOTARY_PASSWORD; skipping notarization of $dmg"
    exit 0
fi

# --wait blocks until Apple's service accepts or rejects the upload (usually minutes).
xcrun notarytool submit "$dmg" "${credentials[@]}" --wait --timeout 30m
xcrun stapler staple "$dmg"
xcrun stapler validate "$dmg"
spctl --assess --type open --context context:primary-signature --verbose=2 "$dmg"
echo "notarize: $dmg is notarized and stapled"
