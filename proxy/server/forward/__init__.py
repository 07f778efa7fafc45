"""Forward-proxy mode (SPEC §10): ``CONNECT`` interception with credproxy's CA, opaque tunnels,
absolute-form ``http://``. ``ca`` (the CA and leaf certificates), ``connect`` (the CONNECT head),
``listener`` (the connection before the HTTP protocol takes over). Which name means which credential
is ``proxy.host_map`` (pure data, shared with config checks and routing)."""
