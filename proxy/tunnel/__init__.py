"""The forward-proxy listener: CONNECT decisions, the interception CA, the
listener and its tunnels."""
