"""Transfer Layer training, evaluation and sweeps (the layers themselves live in runtime.transfer)."""
