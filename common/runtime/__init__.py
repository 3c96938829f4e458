"""Running the model: backend selection (backend.py), process groups and torchrun (distributed.py),
generation (generate.py) and the model loading every command shares (loading.py)."""
