"""`sgserve bench`: a load generator (closed loop and open loop, sgserve ZeroMQ and TF Serving REST
targets) and its CLI. It talks to a server only through its public endpoints, like any other client.

``loadgen`` is the entry point and re-exports the public names of the pieces: ``config`` (what to
run), ``targets`` (the endpoints), ``runner`` (the sender threads), ``results`` (numbers, report,
table), ``plot``, ``progress`` (rich bars on a terminal, plain lines elsewhere) and ``cli``."""
