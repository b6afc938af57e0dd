"""``python -m kernels.bench``: the loss-kernel benchmark, :mod:`kernels.weighted_ce.bench`."""
from kernels.weighted_ce.bench import main

if __name__ == "__main__":
    main()
