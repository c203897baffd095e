"""Edge services that talk to the outside world: the OONI API client and the poller that feeds Kafka."""
