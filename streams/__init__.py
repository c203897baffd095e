"""Detection: the pure engine (``streams.detection``), its Faust shell and the offline backtest."""
