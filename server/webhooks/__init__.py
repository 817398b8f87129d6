"""Alert events delivered to the server's webhook (docs/server.md, "Webhooks").

`events` records an event in the unit of work that changes the alert;
`delivery` sends the recorded events, signed (`signing`), retried with backoff;
`deliveries` lists them and sends a given-up one again.
"""
