"""The HTTP layer: the Starlette app and its error handling, the OpenAI routes with the
stream relay, the admin endpoints and the session endpoints. It talks to llama-server
only through :class:`~hotmodel.router.client.RouterClient`."""
