#!/usr/bin/env bash
# The edgefleet demo: everything that exists so far, end to end, in demo-output/.
#   keys and trust root -> convert a trained CNN -> signed bundle -> verify as a
#   device would -> inspect
#   -> an attacker's tampered copy and a wrong-key bundle, both refused
#   -> release key rotation that devices follow one version at a time
#   -> an offline device: agent install from a file, a refused tampered bundle, predict
set -euo pipefail
out=demo-output
rm -rf "$out"
mkdir -p "$out"

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n$ %s\n' "$bold" "$1" "$plain" "${*:2}"; "${@:2}"; }
refused() {  # a step that must fail: show the refusal, stop the demo if it passes
    printf '\n%s== %s%s\n$ %s\n' "$bold" "$1" "$plain" "${*:2}"
    if "${@:2}"; then echo "DEMO FAILED: that should have been refused" >&2; exit 1; fi
}

step "Create root, release and server keys and trust root v1" \
    edgefleet keys init "$out/keys"

# A real model: a CNN trained on scikit-learn's digits (tests/fixtures/models),
# converted for the target, proven against the float model, signed.
python demo/make_data.py "$out"
step "Convert the CNN for aarch64: try every valid quantization, measure, choose, sign" \
    edgefleet convert tests/fixtures/models/digits_cnn.onnx --target aarch64 \
    --calibration "$out/calibration.npz" --validation "$out/validation.npz" \
    --labels "$out/labels.npy" -o "$out/model"

step "Build a bundle signed with the release key" \
    edgefleet bundle build "$out/model" --name demo-model --version 1.0.0 \
    --key "$out/keys/release.key" -o "$out/demo-model-1.0.0.efb"

step "Verify it as an aarch64 device does" \
    edgefleet bundle verify "$out/demo-model-1.0.0.efb" --trust "$out/keys/trust.json" \
    --profile aarch64

step "Inspect it" edgefleet bundle inspect "$out/demo-model-1.0.0.efb"

cp "$out/demo-model-1.0.0.efb" "$out/tampered.efb"
python - "$out/tampered.efb" <<'PY'
import sys
with open(sys.argv[1], "r+b") as bundle:  # flip one bit inside the model's bytes
    bundle.seek(200_000)
    byte = bundle.read(1)[0]
    bundle.seek(200_000)
    bundle.write(bytes([byte ^ 1]))
PY
refused "An attacker changes one byte of the model: refused" \
    edgefleet bundle verify "$out/tampered.efb" --trust "$out/keys/trust.json"

edgefleet bundle build "$out/model" --name demo-model --version 9.9.9 \
    --key "$out/keys/server.key" -o "$out/server-signed.efb" >/dev/null
refused "A stolen server key signs a bundle: refused (only release keys sign bundles)" \
    edgefleet bundle verify "$out/server-signed.efb" --trust "$out/keys/trust.json"

refused "A device with security floor above this release: refused" \
    edgefleet bundle verify "$out/demo-model-1.0.0.efb" --trust "$out/keys/trust.json" \
    --floor 2000000000000

step "Add a second release key: trust root v2, signed by the root key" \
    edgefleet keys generate -o "$out/keys/release-2.key"
edgefleet keys rotate --trust "$out/keys/trust.json" --root-key "$out/keys/root.key" \
    --add-release "$out/keys/release-2.pub"

edgefleet bundle build "$out/model" --name demo-model --version 1.1.0 \
    --key "$out/keys/release-2.key" -o "$out/demo-model-1.1.0.efb" >/dev/null
step "A device flashed with v1 accepts v2, then the bundle signed by the new key" \
    edgefleet bundle verify "$out/demo-model-1.1.0.efb" --trust "$out/keys/trust.v1.json" \
    --newer-trust "$out/keys/trust.json"

# A device (this machine plays an aarch64 board, offline: no broker).
step "Flash a device: configure its agent with trust root v1" \
    edgefleet agent init --device-id demo-device --trust "$out/keys/trust.v1.json" \
    --profile aarch64 --state-dir "$out/device" -o "$out/device.toml"

step "A field engineer installs the bundle from a USB stick: verify, smoke test, switch" \
    edgefleet agent install "$out/demo-model-1.0.0.efb" --config "$out/device.toml"

refused "The tampered bundle is refused by the device, which keeps serving 1.0.0" \
    edgefleet agent install "$out/tampered.efb" --config "$out/device.toml"

step "Predict a batch on the device" \
    edgefleet agent predict --input "$out/validation.npz" -o "$out/predictions.npz" \
    --config "$out/device.toml"

step "Device status" edgefleet agent status --config "$out/device.toml"

printf '\nDemo complete: files are in %s/\n' "$out"
