"""The parallel runtime:

    workers.py        a layer's work split over threads, one per core (parallel.map), and the
                      groups whose members sum values across themselves (all_sum)
    processes.py      worker processes forked with a copy of the model, sharing memory, for the
                      data-parallel step (Linux)
    data_parallel.py  the data-parallel training step: the batch split over whole-model copies
    group.py          the interface every transport serves (sum, sum_in_place), and packing
    mpi.py            the processes mpiexec starts, as one group (mpi4py): data-parallel
                      training over MPI, on one machine or many
    nccl.py           the same over NCCL, for GPUs (CuPy)
"""
