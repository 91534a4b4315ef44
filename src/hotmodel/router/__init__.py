"""Everything that touches llama-server: the HTTP client (the only code that speaks HTTP
to it), the ``/models/sse`` event feed, the router process supervisor, and provisioning
of the binary and the demo models."""
