"""The common base every package stands on: runtime settings, errors and exit codes, logging, redaction,
the device, stopping on signals, the URI grammar."""
