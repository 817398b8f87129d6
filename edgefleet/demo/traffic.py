"""The demo's traffic: held-out digits to every agent's local API, and labelled feedback.

Each round sends every device a batch of digits (`/v1/predict/batch`), takes the
top class of each answer and reports it with the true label (`/v1/feedback`),
as an application whose users correct the device would. Answers are counted per
version the device said it served, so the summary shows each version's accuracy.
`shift` brightens the digits of some devices from then on, as a camera whose
exposure changed would: their inputs drift, the others' stay as they were.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgefleet.demo.model import Digits

BATCH = 8
ROUND_PAUSE_S = 0.2
BRIGHTER = 0.3  # added to every pixel of a shifted device's digits (pixels are in [0, 1])


class Traffic:
    """Runs in a thread until stopped; `requests`, `correct` and `failures` are its counts.

    `requests` and `correct` count per version served, and apart ("VERSION, shifted
    inputs") for the digits a shifted device answered.
    """

    def __init__(self, digits: Digits, ports: dict[str, int]) -> None:
        self.digits = digits
        self.ports = ports
        self.requests: Counter[str] = Counter()  # per version served
        self.correct: Counter[str] = Counter()
        self.failures = 0
        self.shifted: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(1)
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shift(self, devices: set[str]) -> None:
        """Brighten the digits sent to `devices` from the next round on."""
        self.shifted = frozenset(devices)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            while not self._stop.wait(ROUND_PAUSE_S):
                rows = self._rng.integers(0, len(self.digits.held_out), (len(self.ports), BATCH))
                list(pool.map(self._serve, self.ports, rows))

    def _serve(self, device: str, rows: np.ndarray) -> None:
        base = f"http://127.0.0.1:{self.ports[device]}/v1"
        features = self.digits.held_out[rows]
        shifted = device in self.shifted
        if shifted:
            features = np.clip(features + BRIGHTER, 0.0, 1.0).astype(np.float32)
        try:
            version = _get_json(f"{base}/model")["current"]["version"]
            buffer = io.BytesIO()
            np.savez(buffer, features=features)
            answer = _post(f"{base}/predict/batch", buffer.getvalue(), "application/octet-stream")
            with np.load(io.BytesIO(answer)) as outputs:
                predicted = outputs["probabilities"].argmax(axis=1)
            labels = self.digits.held_out_labels[rows]
            for guess, label in zip(predicted.tolist(), labels.tolist(), strict=True):
                body = json.dumps({"predicted": guess, "label": label}).encode()
                _post(f"{base}/feedback", body, "application/json")
        except (OSError, ValueError, KeyError, TypeError):  # no model yet, or switching models
            with self._lock:
                self.failures += 1
            return
        served = f"{version}, shifted inputs" if shifted else str(version)
        with self._lock:
            self.requests[served] += len(labels)
            self.correct[served] += int((predicted == labels).sum())


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(url: str, body: bytes, content_type: str) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        data: bytes = response.read()
    return data
