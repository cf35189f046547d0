"""The broker side of sgserve: routing, dispatch policies, the worker table and supervision.

Imports no TensorFlow: the broker stays a small, fast process.
"""
from sgserve.broker.broker import BindError, Broker
from sgserve.broker.policies import DispatchPolicy, DispatchRequest, load_policy
from sgserve.broker.supervisor import DEFAULT_WORKER_COMMAND, Supervisor, assign_cores
from sgserve.broker.worker_table import WorkerSlot, WorkerState, WorkerTable

__all__ = ["Broker", "BindError", "DispatchPolicy", "DispatchRequest", "load_policy", "Supervisor",
           "DEFAULT_WORKER_COMMAND", "assign_cores", "WorkerSlot", "WorkerState", "WorkerTable"]
