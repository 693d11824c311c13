"""The training loop's pieces: schedules, EMA, the trainer skeleton and its logging, FLOP counts."""
