"""dsv4: DeepSeek-V4 on Ascend NPUs with a GPU parity path.

Subpackages: dsv4.common (config, model graph, reference ops, loading, cache, parity, CLI),
dsv4.ascend (torch_npu backend + CPU emulation of its operators), dsv4.cuda (Triton backend).
Importing dsv4 imports neither torch_npu nor triton.

torch auto-loads every installed device backend at `import torch` (its `torch.backends` entry points), and a
torch-npu install without CANN then makes `import torch` itself fail (the extension's .so needs libascendcl/libhccl).
So dsv4 switches the auto-loading off before anything imports torch (setdefault: an explicit choice in the
environment wins), and the Ascend backend imports torch_npu explicitly, in its probe, where a failure becomes a
reason `dsv4 doctor` prints (shared/notes/toolchain.md, "torch_npu"). This runs first for `python -m dsv4` and for
the `dsv4` console script alike, since both import this package before dsv4.common.cli.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"
