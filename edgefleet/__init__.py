"""edgefleet: take a trained model to a fleet of edge devices and keep it healthy there.

The core package (this one) is installed everywhere, devices included. It holds
the contract between the deployables: the bundle format, keys and the trust
root, the MQTT topics and message schemas. It imports no deployable.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
