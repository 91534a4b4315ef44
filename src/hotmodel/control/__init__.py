"""The control loop: one task owns the active model and executes every change to the
router's model set (switch, rollback, first load, unload) as a queued command; the
traffic gate admits requests around those changes; GPU probes watch memory."""
