#!/usr/bin/env bash
# The edgefleet demo: everything that exists so far, end to end, in demo-output/.
#   keys and trust root -> convert a trained CNN -> signed bundle -> verify as a
#   device would -> inspect
#   -> an attacker's tampered copy and a wrong-key bundle, both refused
#   -> release key rotation that devices follow one version at a time
#   -> an offline device: agent install from a file, a refused tampered bundle, predict
#   -> the fleet server with its embedded broker, an agent that enrolls itself, and a
#      staged rollout to it
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

# 360 images in one call: the time limit grows with the batch, from the time per image
# the device measured in its smoke test (docs/agent.md, "Time limits").
step "Predict a batch on the device" \
    edgefleet agent predict --input "$out/validation.npz" -o "$out/predictions.npz" \
    --config "$out/device.toml"
python - "$out/predictions.npz" "$out/labels.npy" <<'PY'
import sys
import numpy as np
with np.load(sys.argv[1]) as answer:
    predicted = answer["logits"].argmax(axis=1)
labels = np.load(sys.argv[2])
right = int((predicted == labels).sum())
print(f"{right} of {len(labels)} predictions match the labels ({right / len(labels):.1%})")
PY

step "Device status" edgefleet agent status --config "$out/device.toml"

# The fleet server on this machine: one process with SQLite and the pushed bundles in
# demo-output/server, the embedded MQTT broker, open enrollment (a lab, never a fleet).
# A second device, this time connected, plays an aarch64 board as the first one did.
read -r mqtt_port api_port agent_api_port < <(python - <<'PY'
import socket  # three free ports, held open together so that they differ
sockets = [socket.socket() for _ in range(3)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
PY
)
server_pid='' agent_pid=''
stop_fleet() {  # also on any exit, so that nothing outlives the demo
    # SIGTERM, as systemd stops them: each runs its whole shutdown.
    if [ -n "$agent_pid" ]; then
        kill -TERM "$agent_pid" 2>/dev/null || true
        wait "$agent_pid" || true
        agent_pid=''
    fi
    if [ -n "$server_pid" ]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" || true
        server_pid=''
    fi
}
trap stop_fleet EXIT
wait_for() {  # wait_for WHAT PID LOG COMMAND...: poll COMMAND for 60 s while PID runs
    local what=$1 pid=$2 log=$3
    shift 3
    for _ in $(seq 120); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    echo "DEMO FAILED: no $what; the end of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
}

export EDGEFLEET_SERVER="http://127.0.0.1:$api_port"
printf '\n%s== %s%s\n$ %s &\n' "$bold" "Start the fleet server (log: $out/server.log)" "$plain" \
    "edgefleet server run --embedded-broker --mqtt-port $mqtt_port --port $api_port --data $out/server --open-enrollment --trust $out/keys/trust.json --server-key $out/keys/server.key"
edgefleet server run --embedded-broker --mqtt-port "$mqtt_port" --port "$api_port" \
    --data "$out/server" --open-enrollment \
    --trust "$out/keys/trust.json" --server-key "$out/keys/server.key" >"$out/server.log" 2>&1 &
server_pid=$!
wait_for "fleet server" "$server_pid" "$out/server.log" \
    python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$EDGEFLEET_SERVER/api/v1/health"

printf '\n%s== %s%s\n$ %s\n' "$bold" "An operator's API token (the server keeps only its hash)" "$plain" \
    "export EDGEFLEET_TOKEN=\$(edgefleet server token create --role operator --name demo --data $out/server)"
EDGEFLEET_TOKEN=$(edgefleet server token create --role operator --name demo --data "$out/server")
export EDGEFLEET_TOKEN

step "Push the signed bundle: the server verifies it as a device would" \
    edgefleet bundles push "$out/demo-model-1.0.0.efb"

step "Flash a connected device: the broker and the server it enrolls with" \
    edgefleet agent init --device-id demo-fleet-device --trust "$out/keys/trust.json" \
    --profile aarch64 --state-dir "$out/fleet-device" --mqtt "mqtt://127.0.0.1:$mqtt_port" \
    --server "$EDGEFLEET_SERVER" -o "$out/fleet-device.toml"
# -I: the installed edgefleet, not the source tree in the current directory.
python -I - "$out/fleet-device.toml" "$agent_api_port" <<'PY'
# A demo's impatience: a heartbeat and a telemetry window every 2 s, a 3 s health check
# after the switch (defaults 30 s, 60 s, 60 s), and a free port for the local API.
import sys
from pathlib import Path
from edgefleet.agent.config import load_config, write_config
path = Path(sys.argv[1])
config = load_config(path)
config = config.model_copy(update={
    "telemetry": config.telemetry.model_copy(update={"window_seconds": 2, "heartbeat_seconds": 2}),
    "health": config.health.model_copy(update={"duration_seconds": 3.0}),
    "local_api": config.local_api.model_copy(update={"port": int(sys.argv[2])}),
})
write_config(path, config)
PY

printf '\n%s== %s%s\n$ %s &\n' "$bold" "Run its agent: it makes a device key and enrolls (log: $out/agent.log)" \
    "$plain" "edgefleet agent run --config $out/fleet-device.toml"
edgefleet agent run --config "$out/fleet-device.toml" >"$out/agent.log" 2>&1 &
agent_pid=$!
wait_for "online device" "$agent_pid" "$out/agent.log" \
    sh -c 'edgefleet devices list --online --json | grep -q demo-fleet-device'
step "The device enrolled and reports, every message signed with its key" edgefleet devices list

# The smallest plan: a third of the devices, then everyone; a 5 s bake per stage.
printf 'stages: [{percent: 34}, {percent: 100}]\ngates: {bake_s: 5}\n' >"$out/plan.yaml"
printf '\n%s== %s%s\n$ %s\n' "$bold" "Start a staged rollout with the smallest plan" "$plain" \
    "edgefleet rollout start --bundle demo-model@1.0.0 --plan $out/plan.yaml"
started=$(edgefleet rollout start --bundle demo-model@1.0.0 --plan "$out/plan.yaml")
echo "$started"
rollout_id=$(sed -n 's/^started rollout \([0-9]*\):.*/\1/p' <<<"$started")

step "Watch it: directive, install on the device, gates, next stage, completed" \
    edgefleet rollout status "$rollout_id" --watch --interval 1

step "The fleet now serves the new version" edgefleet devices list

printf '\n%s== %s%s\n' "$bold" "Stop the agent, then the server (and its broker)" "$plain"
stop_fleet
printf '\nDemo complete: files are in %s/\n' "$out"
