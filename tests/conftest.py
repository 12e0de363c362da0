import os

# Make the tests reproducible on the CI's 2 cores and independent of the machine's core count.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
