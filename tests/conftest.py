"""One torch thread per test process: the tiny models' ops are too small to gain from a second thread, and on a
shared 2-core machine (CI, or the gloo tests' several ranks) a second spinning thread made suites up to 10x slower."""

import torch

torch.set_num_threads(1)
