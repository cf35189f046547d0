"""TF Serving's front doors: its gRPC and REST APIs, and Prometheus metrics.

A gateway process (gateway.py) serves them and forwards each request to the broker over the native
ZeroMQ protocol, as any other client does: the broker, the workers and the native wire stay as
they are. This package imports no TensorFlow (protos.py loads TF Serving's protos without it).
"""
