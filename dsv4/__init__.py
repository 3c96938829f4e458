"""dsv4: DeepSeek-V4 on Ascend NPUs with a GPU parity path.

Subpackages: dsv4.common (config, model graph, reference ops, loading, cache, parity, CLI),
dsv4.ascend (torch_npu backend + CPU emulation of its operators), dsv4.cuda (Triton backend).
Importing dsv4 imports neither torch_npu nor triton.
"""

__version__ = "0.1.0"
