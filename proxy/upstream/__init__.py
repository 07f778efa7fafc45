"""The upstream side: client, address policy, mutual TLS, outbound request, relay."""
