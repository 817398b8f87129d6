"""Every error the core raises, in one tree.

    EdgefleetError
    ├── UntrustedInputError          input from outside was refused; nothing was installed or kept
    │   ├── SignatureError           the signatures on a document do not satisfy its role
    │   │   ├── UnknownKeyError          signed by a key the trust root does not list
    │   │   ├── WrongRoleError           signed by a listed key of another role
    │   │   ├── BadSignatureError        a listed key's signature does not verify
    │   │   └── ThresholdError           too few distinct keys signed (repeats count once)
    │   ├── MalformedDocumentError   not a well-formed signed document of the expected type
    │   ├── TrustRootError
    │   │   ├── TrustRootExpiredError
    │   │   ├── TrustRootVersionError    a new trust root that is not exactly version N+1
    │   │   ├── TrustRootSignatureError  a new trust root not signed by old and new root keys
    │   │   └── ServerKeyNotListedError  a trust root whose server role lacks the server's key
    │   ├── BundleError
    │   │   ├── NotABundleError          empty, not a tar archive, or no manifest first
    │   │   ├── BundleTruncatedError
    │   │   ├── BundleTooLargeError
    │   │   ├── ManifestTooLargeError
    │   │   ├── TamperedFileError        a file's SHA-256 differs from the manifest's
    │   │   ├── FileLengthError          a file's length differs from the manifest's
    │   │   ├── UnlistedFileError        a file in the bundle that the manifest does not list
    │   │   ├── MissingFileError         a file the manifest lists that the bundle lacks
    │   │   ├── DuplicateFileError
    │   │   ├── UnsafePathError          absolute, `..`, or otherwise not a plain relative path
    │   │   ├── PathConflictError        a listed file is also a directory of another (`a`, `a/b`)
    │   │   ├── LinkInBundleError        symlink, hard link, device or any non-regular member
    │   │   ├── ProfileMismatchError     the bundle does not support the device's hardware profile
    │   │   ├── AgentTooOldError         the bundle needs a newer agent
    │   │   ├── NothingToServeError      no model to serve: neither model.onnx nor model.tflite
    │   │   ├── RuntimeNotOnProfileError its model needs a runtime a profile it lists does not run
    │   │   └── BelowSecurityFloorError  release counter below the device's floor
    │   ├── DirectiveError
    │   │   ├── WrongDeviceError
    │   │   ├── ReplayedDirectiveError   sequence number not above the last accepted one
    │   │   ├── DirectiveExpiredError
    │   │   └── DirectiveFromFutureError issued ahead of this device's clock by over the skew
    │   ├── FleetTimestampError          stale sequence or expired: the device may be frozen out
    │   ├── FleetAcceptsError            the server's fields announcement, stale or expired
    │   ├── MessageSchemaError       an MQTT payload that does not match its schema
    │   └── DeviceSignatureError     a device message not signed by that device's enrolled key
    └── LocalError                   a problem on this machine, not in the input
        ├── KeyFileError             unreadable key file, wrong or missing passphrase
        ├── UsageError               the caller asked for something inconsistent
        └── PublishError             the broker did not take a message

Untrusted-input errors are what an attacker can provoke: callers report them and
keep their trusted state unchanged. Local errors are for the operator to fix.
The fleet server's API answers with errors of its own (ServerError and below),
which its clients raise too: they are the wire contract's (`edgefleet.wire`).
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every edgefleet error."""


class UntrustedInputError(EdgefleetError):
    """Input from outside was refused; nothing was installed or kept."""


class SignatureError(UntrustedInputError):
    """The signatures on a document do not satisfy the role that must sign it."""


class UnknownKeyError(SignatureError):
    """Signed by a key that the trust root does not list at all."""


class WrongRoleError(SignatureError):
    """Signed by a key the trust root lists, but for another role."""


class BadSignatureError(SignatureError):
    """A key of the right role signed, but the signature does not verify."""


class ThresholdError(SignatureError):
    """Fewer distinct keys of the role signed than its threshold requires."""


class MalformedDocumentError(UntrustedInputError):
    """Not a well-formed signed document of the expected type."""


class TrustRootError(UntrustedInputError):
    """A trust root that must not be trusted."""


class TrustRootExpiredError(TrustRootError):
    """The newest trust root has expired: ask the root key holders for a new one."""


class TrustRootVersionError(TrustRootError):
    """A new trust root that is not exactly one version above the trusted one."""


class TrustRootSignatureError(TrustRootError):
    """A new trust root not signed by the root keys of both the old and the new version."""


class ServerKeyNotListedError(TrustRootError):
    """A trust root whose server role does not list the fleet server's key: devices
    would refuse everything that server signs."""


class BundleError(UntrustedInputError):
    """A bundle that must not be installed."""


class NotABundleError(BundleError):
    """The file is empty, not a tar archive, or does not start with a manifest."""


class BundleTruncatedError(BundleError):
    """The bundle ends before its last member is complete."""


class BundleTooLargeError(BundleError):
    """The bundle exceeds the size limit."""


class ManifestTooLargeError(BundleError):
    """The manifest exceeds the size limit."""


class TamperedFileError(BundleError):
    """A file's SHA-256 differs from the one the manifest lists."""


class FileLengthError(BundleError):
    """A file's length differs from the one the manifest lists."""


class UnlistedFileError(BundleError):
    """The bundle holds a file that the manifest does not list."""


class MissingFileError(BundleError):
    """The manifest lists a file that the bundle lacks."""


class DuplicateFileError(BundleError):
    """The same path appears twice in the bundle or the manifest."""


class UnsafePathError(BundleError):
    """An absolute path, a `..` component, or another path that could escape the bundle."""


class PathConflictError(BundleError):
    """A listed file's path is also a directory of another listed path (`a` and `a/b`)."""


class LinkInBundleError(BundleError):
    """A symlink, hard link, device or any member that is not a regular file."""


class ProfileMismatchError(BundleError):
    """The bundle does not list the device's hardware profile."""


class AgentTooOldError(BundleError):
    """The bundle needs a newer agent than the one checking it."""


class NothingToServeError(BundleError):
    """The bundle holds none of the models an agent serves (model.onnx, model.tflite)."""


class RuntimeNotOnProfileError(BundleError):
    """The bundle's model needs a runtime that a hardware profile it is for does not run."""


class BelowSecurityFloorError(BundleError):
    """The bundle's release counter is below the security floor."""


class DirectiveError(UntrustedInputError):
    """A directive that must not be acted on."""


class WrongDeviceError(DirectiveError):
    """A directive addressed to another device."""


class ReplayedDirectiveError(DirectiveError):
    """A directive whose sequence number is not above the last one accepted."""


class DirectiveExpiredError(DirectiveError):
    """A directive past its expiry."""


class DirectiveFromFutureError(DirectiveError):
    """A directive issued further ahead of this device's clock than the allowed skew."""


class FleetTimestampError(UntrustedInputError):
    """A fleet timestamp that is stale or expired: the device may be frozen out."""


class FleetAcceptsError(UntrustedInputError):
    """The server's announcement of the fields it accepts, stale or expired."""


class MessageSchemaError(UntrustedInputError):
    """An MQTT payload that does not match its schema."""


class DeviceSignatureError(UntrustedInputError):
    """A device-to-server message that its device's enrolled key did not sign for its topic.

    Unsigned, cut short, signed by another key, moved to another topic, or changed.
    """


class LocalError(EdgefleetError):
    """A problem on this machine, not in the input: for the operator to fix."""


class KeyFileError(LocalError):
    """A key file that cannot be read: missing, malformed, or a wrong or missing passphrase."""


class UsageError(LocalError):
    """The caller asked for something inconsistent."""


class PublishError(LocalError):
    """The broker did not take the message: not connected, queue full, or refused."""
