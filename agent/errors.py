"""Errors of the agent.

    AgentError (edgefleet EdgefleetError)
    ├── ConfigError               agent.toml missing, unreadable or invalid (exit 2)
    ├── InputSchemaError          a prediction input that does not match the model's schema
    │   └── BatchTooLargeError        more samples than one call may take (max_batch_samples)
    ├── InferenceError            every step of the fallback chain failed
    ├── NoModelError              nothing installed yet and no default answer configured
    ├── InstallError              an install failed; the device still serves the old model
    │   ├── CompatibilityError        profile, runtime, agent version, disk or memory
    │   ├── SmokeTestError            the bundle's own samples do not give its expected outputs
    │   ├── HealthCheckError          errors, fallbacks or latency under live traffic
    │   └── DownloadError             a transport failed (transient: retried with backoff)
    ├── InstallInProgressError    another install is running (state machine busy)
    ├── AgentRunningError         another agent (or in-process change) holds the state directory
    ├── RollbackError             nothing to roll back to
    ├── PrivatePathError          an install from a file inside the agent's state directory
    └── EnrollmentError           enrolling this device with the fleet server failed
        ├── EnrollmentRefusedError    the server said no (bad token, a new key for an id): fatal
        └── ServerUnreachableError    no answer, or a 5xx or 429 (transient: retried)

Bundle, signature and directive refusals come from edgefleet.errors
(UntrustedInputError and below) unchanged: callers report them as they are.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError, LocalError


class AgentError(EdgefleetError):
    """Base of the agent's own errors."""


class ConfigError(AgentError, LocalError):
    """agent.toml is missing, unreadable or invalid."""


class InputSchemaError(AgentError):
    """A prediction input that does not match the model's schema (name, dtype, shape, NaN)."""


class BatchTooLargeError(InputSchemaError):
    """A batch with more samples than one model call may take (`max_batch_samples`)."""


class InferenceError(AgentError):
    """Every step of the fallback chain failed for this request."""


class NoModelError(AgentError):
    """No model is installed and no default answer is configured."""


class InstallError(AgentError):
    """An install failed; the device keeps serving the model it had."""


class CompatibilityError(InstallError):
    """The bundle cannot run here: profile, runtime, agent version, disk or memory."""


class SmokeTestError(InstallError):
    """The bundle's sample inputs do not give its expected outputs on this device."""


class HealthCheckError(InstallError):
    """The new model's error rate, fallback rate or latency under live traffic is too high."""


class DownloadError(InstallError):
    """A transport failed to deliver the bundle (transient: retried with backoff)."""


class InstallInProgressError(AgentError):
    """Another install is running."""


class AgentRunningError(AgentError, LocalError):
    """Another agent runs on the state directory, or another `agent install` changes it."""


class RollbackError(AgentError):
    """There is no previous version to roll back to."""


class PrivatePathError(AgentError, LocalError):
    """An install asked for a file inside the agent's state directory (its key, its state)."""


class EnrollmentError(AgentError):
    """Enrolling this device with the fleet server failed."""


class EnrollmentRefusedError(EnrollmentError):
    """The server refused the enrollment (4xx); the message is the server's own."""


class ServerUnreachableError(EnrollmentError):
    """The server did not answer, or answered 5xx or 429: try again later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds, when the server said (Retry-After)
