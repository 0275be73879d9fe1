"""The training tool behind python -m minicnn.train / evaluate / predict: trainer.py (the loop,
checkpoints, signals, history), checkpoint.py, evaluate.py, predict.py, metrics.py, plots.py,
and cli.py (exit status 2 and one sentence for bad input)."""
