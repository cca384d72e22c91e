"""importd's D-Bus front end: the Manager and Transfer objects."""
