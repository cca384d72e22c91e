"""machined's D-Bus front end: the Manager, Machine and Image objects."""
