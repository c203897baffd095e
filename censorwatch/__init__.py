"""censorwatch: streaming censorship alerts from OONI measurements.

Shared core used by every service: settings, data models, topic names, Kafka helpers and the CLI.
The services live beside it: ``services`` (OONI poller), ``streams`` (Faust detection), ``alerts`` (delivery).
"""

__version__ = "0.1.0"
