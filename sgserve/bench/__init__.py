"""`sgserve bench`: a closed-loop load generator (sgserve ZeroMQ and TF Serving REST targets) and its
CLI. It talks to a server only through its public endpoints, like any other client."""
