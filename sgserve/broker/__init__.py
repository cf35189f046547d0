"""The broker process: the client-facing ROUTER, the routing core (policies, deadlines, retry,
backpressure), the worker table, the supervisor that starts and restarts workers, and the rollout of
model versions to workers. It imports no TensorFlow, so it stays a small, fast process; it reads
model versions through sgserve.models and never imports the worker package.

Import what you need from its modules (sgserve.broker.broker.Broker, sgserve.broker.supervisor,
...): this package file imports nothing, so that importing one module does not import them all.
"""
