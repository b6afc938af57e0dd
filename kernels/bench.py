"""``python -m megareweight.kernels.bench``: the loss-kernel benchmark, :mod:`megareweight.kernels.weighted_ce.bench`."""
from megareweight.kernels.weighted_ce.bench import main

if __name__ == "__main__":
    main()
