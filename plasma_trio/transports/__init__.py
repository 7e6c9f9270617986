"""Transports: how subscribers and publishers reach the hub (HTTP/SSE, gRPC)."""
