"""The fleet server's MQTT side.

- `interfaces`: `Publisher` (server -> broker), `DeviceKeys`, `MessageHandler`;
  domain code depends on these, never on paho.
- `link.ServerLink`: the replica's paho connection (shared subscriptions for
  device messages, plain for presence; a queue and a worker thread, messages
  acknowledged once stored, the broker's flow control bounding the rest);
  implements `Publisher`.
- `ingest.Ingestor`: device messages -> device state, status history and
  telemetry buckets, checked (device signature, schema) and written in batches.
- `aggregate`: pure merging of telemetry windows.
- `retention.run_retention` (the retention worker's step): old buckets out, silent
  devices offline.
- `broker.EmbeddedBroker`: the iotcore (rumqttd) broker for one-machine setups.
- `blockservice.BlockService`: bundle blocks over MQTT.

Submodules are imported explicitly (nothing is imported here), so importing
`interfaces` does not pull in paho, SQLAlchemy or iotcore.
"""
