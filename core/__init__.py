"""The bottom layer every app may use: money, database helpers, encryption, outbound-address
rules, strict JSON and the task outbox. It imports no CascadeFlow app (``.importlinter``)."""
