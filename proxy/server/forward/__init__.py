"""Forward-proxy mode (SPEC §10): ``CONNECT`` interception with credproxy's CA, opaque tunnels,
absolute-form ``http://``. ``hosts`` (which name means which credential), ``ca`` (the CA and leaf
certificates), ``connect`` (the CONNECT head), ``listener`` (the connection before the HTTP protocol
takes over)."""
