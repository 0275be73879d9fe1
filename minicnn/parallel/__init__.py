"""The parallel runtime, in three layers:

    workers.py        a layer's work split over threads, one per core (parallel.map), and the
                      groups whose members sum values across themselves (all_sum)
    processes.py      worker processes forked with a copy of the model, sharing memory, for the
                      data-parallel step (Linux)
    data_parallel.py  the data-parallel training step: the batch split over whole-model copies
"""
