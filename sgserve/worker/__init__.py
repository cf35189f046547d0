"""Worker processes: pinned to their cores, serving models from shared memory."""
