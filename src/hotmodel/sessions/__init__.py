"""Conversations belong to hotmodel, not to the loaded model: the pure context rules
(what is new, what is sent, how it is bounded), the SQLite store, the service that
prepares and records a session's turns and replays one into a new model, and the
per-session lock that keeps one writer per session."""
