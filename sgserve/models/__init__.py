"""Everything about a model version, from files on disk to a segment workers can map.

It owns TF Serving's file formats (the model server config, batching parameters, warmup records),
version discovery and version policies, the loader (a long-lived process that reads a checkpoint
once and writes every variable into one shared-memory segment), the graph rewrite that turns
variables into plain inputs, the segment format, the checkpoint index (which tensors changed
between versions), the built-in demo model, and the manager that decides which versions load and
unload. It imports only shared modules (config, errors, process, protocol), never the broker or
the worker; both of them read versions through it.
"""
