"""Drop-in facades for other libraries' APIs (``robustkern.compat.auto_lirpa``)."""
